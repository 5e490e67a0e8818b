//! Random strings from the OS random source.

use secrecy::SecretString;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// `len` characters of `A-Z a-z 0-9`, each about 5.95 bits, uniformly drawn from the OS random
/// source. There is no fallback: without the OS source there is no secret.
pub fn alphanumeric(len: usize) -> Result<SecretString, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        // Rejection sampling keeps every symbol equally likely: 248 = 4 × 62.
        for b in buf {
            if b < 248 && out.len() < len {
                out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            }
        }
    }
    Ok(SecretString::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn strings_have_the_length_and_alphabet_and_differ() {
        let a = alphanumeric(32).unwrap();
        let b = alphanumeric(32).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 32);
        assert!(a.expose_secret().bytes().all(|c| ALPHABET.contains(&c)));
        assert_eq!(alphanumeric(200).unwrap().expose_secret().len(), 200);
    }
}
