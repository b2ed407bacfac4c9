//! The token page's CSRF token (SPEC §5): HMAC-SHA256 of the caller's credential hash under a
//! random key kept in the store, so every replica, and the process after a restart, makes and
//! accepts the same token for the same credential. Another site cannot compute it without the
//! credential, and it changes when the credential (the session cookie) does.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;

use crate::store::{Store, StoreError};

/// The name of the key in the store.
const KEY_NAME: &str = "page-csrf";

/// What the page's forms carry for one credential.
pub struct Csrf {
    key: hmac::Key,
    credential: [u8; 32],
}

impl Csrf {
    /// The CSRF token maker for the credential whose SHA-256 is `credential`.
    pub async fn load(store: &Store, credential: [u8; 32]) -> Result<Csrf, StoreError> {
        let key = store.key(KEY_NAME).await?;
        Ok(Csrf::with_key(&key, credential))
    }

    fn with_key(key: &[u8; 32], credential: [u8; 32]) -> Csrf {
        Csrf {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            credential,
        }
    }

    /// The token for the page's forms.
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.key, &self.credential))
    }

    /// Whether a submitted token is this credential's (compared in constant time).
    pub fn verify(&self, submitted: &str) -> bool {
        URL_SAFE_NO_PAD
            .decode(submitted.trim())
            .is_ok_and(|tag| hmac::verify(&self.key, &self.credential, &tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_bound_to_the_credential_and_the_key() {
        let csrf = Csrf::with_key(&[1; 32], [7; 32]);
        let token = csrf.token();
        assert!(csrf.verify(&token));
        assert!(!csrf.verify(""));
        assert!(!csrf.verify("not base64 !"));
        assert!(!csrf.verify(&token[..token.len() - 2]));
        assert!(!Csrf::with_key(&[1; 32], [8; 32]).verify(&token));
        assert!(!Csrf::with_key(&[2; 32], [7; 32]).verify(&token));
        assert_eq!(Csrf::with_key(&[1; 32], [7; 32]).token(), token);
    }
}
