//! Property tests of request validation: no input panics, and whatever is accepted is valid by
//! the documented rules (checked here by an independent oracle).

use giroident_broker::api::CreateSessionBody;
use giroident_broker::api::request_id::is_acceptable;
use giroident_broker::config::FlowKind;
use giroident_broker::flows::{ClientReference, Email, Phone, SessionRequest};
use proptest::prelude::*;
use serde_json::json;

fn reference_ok(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b))
}

fn email_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.split('@').collect();
    s.chars().count() <= 320
        && !s.chars().any(|c| c.is_control() || c.is_whitespace())
        && parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
}

fn phone_ok(s: &str) -> bool {
    s.len() <= 50
        && s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b" +-()/".contains(&b))
}

/// Strings that are sometimes valid and often not: printable, control characters, unicode.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:@+-]{0,130}",
        "[a-z]{1,10}@[a-z]{1,10}\\.[a-z]{2,3}",
        "[+0-9 ()/-]{0,55}",
        "\\PC{0,40}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bodies_never_panic(body in any::<Vec<u8>>()) {
        if let Ok(parsed) = serde_json::from_slice::<CreateSessionBody>(&body) {
            let _ = parsed.validate(FlowKind::Standalone);
        }
    }

    #[test]
    fn arbitrary_objects_never_panic(
        fields in prop::collection::btree_map(
            prop_oneof![
                Just("flow".to_owned()),
                Just("clientReference".to_owned()),
                Just("email".to_owned()),
                Just("phone".to_owned()),
                "[a-zA-Z]{1,12}",
            ],
            prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                prop_oneof![Just("standalone".to_owned()), Just("access".to_owned()), field()]
                    .prop_map(serde_json::Value::from),
            ],
            0..5,
        ),
    ) {
        // Objects with the body's field names reach validation, unlike random bytes.
        let body = serde_json::to_vec(&fields).expect("a JSON object");
        if let Ok(parsed) = serde_json::from_slice::<CreateSessionBody>(&body) {
            let _ = parsed.validate(FlowKind::Standalone);
        }
        if let Ok(parsed) = serde_json::from_slice::<CreateSessionBody>(&body) {
            let _ = parsed.validate(FlowKind::Access);
        }
    }

    #[test]
    fn accepted_requests_are_valid(
        flow in prop::option::of(prop_oneof![Just("standalone"), Just("access")]),
        reference in prop::option::of(field()),
        email in prop::option::of(field()),
        phone in prop::option::of(field()),
    ) {
        let body = json!({"flow": flow, "clientReference": reference, "email": email, "phone": phone});
        let parsed: CreateSessionBody = serde_json::from_value(body).unwrap();
        match parsed.validate(FlowKind::Access) {
            Ok(SessionRequest::Standalone { client_reference }) => {
                prop_assert_eq!(flow, Some("standalone"));
                prop_assert!(reference_ok(client_reference.as_str()));
                prop_assert!(email.is_none() && phone.is_none());
            }
            Ok(SessionRequest::Access { client_reference: r, email: e, phone: p }) => {
                prop_assert_ne!(flow, Some("standalone"));
                prop_assert_eq!(r.is_some(), reference.is_some());
                prop_assert!(r.as_ref().is_none_or(|r| reference_ok(r.as_str())));
                prop_assert!(e.as_ref().is_none_or(|e| email_ok(e.as_str())));
                prop_assert!(p.as_ref().is_none_or(|p| phone_ok(p.as_str())));
            }
            Err(_) => {}
        }
    }

    #[test]
    fn field_parsers_agree_with_the_rules(s in field()) {
        prop_assert_eq!(ClientReference::parse(&s).is_ok(), reference_ok(&s));
        prop_assert_eq!(Email::parse(&s).is_ok(), email_ok(&s));
        prop_assert_eq!(Phone::parse(&s).is_ok(), phone_ok(&s));
    }

    #[test]
    fn accepted_request_ids_are_header_safe(s in field()) {
        if is_acceptable(&s) {
            prop_assert!(s.len() <= 255);
            prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
}
