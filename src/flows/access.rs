//! Use case 2: GiroIdent together with other finAPI products, through a new Access user.

use secrecy::SecretString;

use crate::config::FlowKind;
use crate::finapi::NewUser;

use super::{
    Email, FlowError, Flows, KycSession, Phone, RequestContext, classify_credentials_call,
    is_unauthorized,
};

/// Length of generated passwords: 32 symbols of `A-Z a-z 0-9`, about 190 bits.
const PASSWORD_LEN: usize = 32;

impl Flows {
    /// Creates a user with the cached client token and returns that user's token.
    pub(super) async fn access(
        &self,
        email: Option<Email>,
        phone: Option<Phone>,
        ctx: &RequestContext,
    ) -> Result<KycSession, FlowError> {
        let user = NewUser {
            id: generate_user_id(),
            password: generate_password()?,
            email: email.map(|e| e.as_str().to_owned()),
            phone: phone.map(|p| p.as_str().to_owned()),
        };
        let user_id = self.create_user(&user, ctx).await?;
        let token = self
            .access
            .user_token(&user_id, &user.password, &ctx.request_id)
            .await
            .map_err(classify_credentials_call)?;
        Ok(KycSession {
            access_token: token.token,
            token_type: token.token_type,
            expires_in: token.expires_in,
            flow: FlowKind::Access,
            user_id: Some(user_id),
        })
    }

    /// `POST /api/v2/users` with the cached client token. A 401 means finAPI no longer accepts
    /// that token: the entry is dropped (if it still holds it) and the call is made once more
    /// with a fresh one. A 401 creates no user, so the retry cannot duplicate one.
    async fn create_user(&self, user: &NewUser, ctx: &RequestContext) -> Result<String, FlowError> {
        let token = self.tokens.get(&ctx.request_id).await?;
        match self
            .access
            .create_user(&token.token, user, &ctx.request_id)
            .await
        {
            Err(err) if is_unauthorized(&err) => {
                tracing::debug!("client token refused; fetching a new one");
                self.tokens.invalidate(&token).await;
            }
            other => return Ok(other?),
        }
        let token = self.tokens.get(&ctx.request_id).await?;
        self.access
            .create_user(&token.token, user, &ctx.request_id)
            .await
            .map_err(|err| {
                if is_unauthorized(&err) {
                    FlowError::ClientTokenRejected(err.into())
                } else {
                    err.into()
                }
            })
    }
}

/// A fresh user id: `gib-` and a random UUID's 32 hex digits (36 characters, finAPI's limit).
fn generate_user_id() -> String {
    format!("gib-{}", uuid::Uuid::new_v4().simple())
}

/// A strong random password from the OS random source (no fallback: without it, no user).
fn generate_password() -> Result<SecretString, FlowError> {
    crate::random::alphanumeric(PASSWORD_LEN).map_err(|_| FlowError::NoRandomness)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_fit_finapi_rules_and_differ() {
        let a = generate_user_id();
        let b = generate_user_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.+@".contains(&c))
        );
    }
}
