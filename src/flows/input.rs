//! Validated inputs of the flows. Whatever a caller sends passes through one of these parsers
//! before it can reach finAPI.

use std::fmt;
use std::net::Ipv4Addr;

use crate::finapi::EndUserMetadata;

/// Why an input value was refused. The message names the rule, never echoes the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    /// The request field.
    pub field: &'static str,
    /// The rule it broke.
    pub rule: &'static str,
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.rule)
    }
}

impl std::error::Error for InvalidInput {}

/// Longest accepted `clientReference`.
pub const CLIENT_REFERENCE_MAX: usize = 128;
/// Longest accepted `email` (finAPI's limit).
pub const EMAIL_MAX: usize = 320;
/// Longest accepted `phone` (finAPI's limit).
pub const PHONE_MAX: usize = 50;

// The rules below as JSON Schema `pattern`s (ECMA-262), for the OpenAPI document. Each accepts
// exactly what its parser accepts, together with the length limits above (which JSON Schema
// counts in characters, as the parsers do); `tests/contract.rs` checks both directions.

/// [`ClientReference`] as a pattern.
pub const CLIENT_REFERENCE_PATTERN: &str = "^[A-Za-z0-9._:@+-]+$";
/// [`Email`] as a pattern, with the refused control and white-space characters spelled out.
pub const EMAIL_PATTERN: &str = concat!(
    "^[^@\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]+",
    "@[^@\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]+$"
);
/// [`Phone`] as a pattern.
pub const PHONE_PATTERN: &str = "^[0-9 +()/-]*[0-9][0-9 +()/-]*$";

/// The caller's reference for a standalone process: 1 to 128 characters of
/// `A-Z a-z 0-9 - _ . : @ +`. finAPI documents no format; this set keeps customer numbers,
/// UUIDs and e-mail-like references while excluding anything that could break a log line or a
/// header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientReference(String);

impl ClientReference {
    /// Checks a caller-given reference.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let invalid = |rule| InvalidInput {
            field: "clientReference",
            rule,
        };
        if value.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if value.len() > CLIENT_REFERENCE_MAX {
            return Err(invalid("must be at most 128 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b))
        {
            return Err(invalid("may contain only A-Z a-z 0-9 - _ . : @ +"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The reference.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An e-mail address for a new finAPI user: at most 320 characters, one `@` with text on both
/// sides, no white space or control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Checks a caller-given address.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let invalid = |rule| InvalidInput {
            field: "email",
            rule,
        };
        if value.chars().count() > EMAIL_MAX {
            return Err(invalid("must be at most 320 characters"));
        }
        if value.chars().any(is_forbidden_in_email) {
            return Err(invalid(
                "must not contain white space or control characters",
            ));
        }
        match value.split_once('@') {
            Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
            {
                Ok(Self(value.to_owned()))
            }
            _ => Err(invalid("must be an address like name@example.com")),
        }
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// Control characters (Unicode category Cc) and white space (Unicode `White_Space`), listed
/// rather than asked of `char` so that [`EMAIL_PATTERN`] can name the same set.
fn is_forbidden_in_email(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{20}'
            | '\u{7F}'..='\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// A phone number for a new finAPI user: at most 50 characters of digits, spaces and
/// `+ - ( ) /`, with at least one digit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone(String);

impl Phone {
    /// Checks a caller-given number.
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        let invalid = |rule| InvalidInput {
            field: "phone",
            rule,
        };
        if value.len() > PHONE_MAX {
            return Err(invalid("must be at most 50 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_digit() || b" +-()/".contains(&b))
            || !value.bytes().any(|b| b.is_ascii_digit())
        {
            return Err(invalid("must be digits, spaces and + - ( ) /"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The number.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// Longest accepted `PSU-Device-OS`.
pub const DEVICE_OS_MAX: usize = 128;
/// Longest accepted `PSU-User-Agent`.
pub const USER_AGENT_MAX: usize = 512;

/// Checks the end user's metadata headers, each optional, as the caller sent them (raw header
/// bytes) and builds what the finAPI calls carry:
/// - `PSU-IP-Address`: an IPv4 address in dotted-quad form (`203.0.113.7`); finAPI takes IPv4
///   only and would silently put its own address in place of anything else, so an IPv6 address
///   or a host name is refused rather than passed on;
/// - `PSU-Device-OS`: 1 to 128 characters, `PSU-User-Agent`: 1 to 512 characters, of visible
///   ASCII and space. finAPI documents no format; these bounds hold any real OS name and
///   browser user agent and keep control characters out of finAPI's logs.
pub fn end_user_metadata(
    ip: Option<&[u8]>,
    device_os: Option<&[u8]>,
    user_agent: Option<&[u8]>,
) -> Result<EndUserMetadata, InvalidInput> {
    let ip = ip
        .map(|raw| {
            std::str::from_utf8(raw)
                .ok()
                .and_then(|text| text.parse::<Ipv4Addr>().ok())
                .ok_or(InvalidInput {
                    field: "PSU-IP-Address",
                    rule: "must be an IPv4 address like 203.0.113.7",
                })
        })
        .transpose()?;
    let device_os = device_os
        .map(|raw| {
            header_text(
                raw,
                "PSU-Device-OS",
                DEVICE_OS_MAX,
                "must be at most 128 characters",
            )
        })
        .transpose()?;
    let user_agent = user_agent
        .map(|raw| {
            header_text(
                raw,
                "PSU-User-Agent",
                USER_AGENT_MAX,
                "must be at most 512 characters",
            )
        })
        .transpose()?;
    Ok(EndUserMetadata::new(ip, device_os, user_agent))
}

/// 1 to `max` bytes of visible ASCII and space.
fn header_text<'a>(
    raw: &'a [u8],
    field: &'static str,
    max: usize,
    too_long: &'static str,
) -> Result<&'a str, InvalidInput> {
    let invalid = |rule| InvalidInput { field, rule };
    let visible = "may contain only visible ASCII characters and spaces";
    if raw.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if raw.len() > max {
        return Err(invalid(too_long));
    }
    if !raw.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err(invalid(visible));
    }
    std::str::from_utf8(raw).map_err(|_| invalid(visible))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_reference_rules() {
        assert!(ClientReference::parse("customer-4711").is_ok());
        assert!(ClientReference::parse("a.b_c:d@e+f").is_ok());
        assert!(ClientReference::parse(&"x".repeat(128)).is_ok());
        for bad in [
            "",
            "with space",
            "crlf\r\nX-Evil: 1",
            "ümlaut",
            "a/b",
            &"x".repeat(129),
        ] {
            assert!(ClientReference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn email_rules() {
        assert!(Email::parse("jane@example.com").is_ok());
        for bad in [
            "",
            "jane",
            "@example.com",
            "jane@",
            "a@b@c",
            "ja ne@x.de",
            "j\n@x.de",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(320));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn email_forbids_exactly_control_and_white_space() {
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            assert_eq!(
                is_forbidden_in_email(c),
                c.is_control() || c.is_whitespace(),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn phone_rules() {
        assert!(Phone::parse("+49 (89) 123-456/7").is_ok());
        for bad in ["", "call me", "+", "123\r\n", &"1".repeat(51)] {
            assert!(Phone::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn end_user_metadata_rules() {
        let ok = end_user_metadata(
            Some(b"203.0.113.7"),
            Some(b"Android 14"),
            Some(b"Mozilla/5.0 (X11; Linux x86_64)"),
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("203.0.113.7"));
        assert!(end_user_metadata(None, None, None).unwrap().is_empty());
        for bad in [
            &b"::1"[..],
            b"2001:db8::1",
            b"203.0.113",
            b"203.0.113.256",
            b"host.example",
            b" 203.0.113.7",
            b"",
        ] {
            let err = end_user_metadata(Some(bad), None, None).unwrap_err();
            assert_eq!(err.field, "PSU-IP-Address", "{bad:?}");
        }
        for bad in [&b""[..], b"tab\there", "Ümlaut".as_bytes(), &[b'x'; 129]] {
            let err = end_user_metadata(None, Some(bad), None).unwrap_err();
            assert_eq!(err.field, "PSU-Device-OS", "{bad:?}");
        }
        assert!(end_user_metadata(None, Some(&[b'x'; 128]), Some(&[b'y'; 512])).is_ok());
        let err = end_user_metadata(None, None, Some(&[b'y'; 513])).unwrap_err();
        assert_eq!(err.field, "PSU-User-Agent");
    }
}
