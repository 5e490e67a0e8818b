//! Use case 2: GiroIdent together with other finAPI products, through a new Access user.

use std::sync::Arc;

use secrecy::SecretString;

use crate::config::FlowKind;
use crate::finapi::{AccessToken, NewUser, Step};
use crate::resilience::Deadline;
use crate::token_cache::ClientToken;

use super::retry::ResilienceStats;
use super::{Email, FlowError, Flows, KycSession, Phone, RequestContext, is_unauthorized};

/// Length of generated passwords: 32 symbols of `A-Z a-z 0-9`, about 190 bits.
const PASSWORD_LEN: usize = 32;

/// A created user whose token is being asked for. When the flow is dropped before the answer
/// (the client went away, or the request's time ran out), nobody will see this user: it is
/// counted and logged as orphaned then, as it is when the password grant fails.
struct Unclaimed<'a> {
    stats: &'a ResilienceStats,
    user_id: &'a str,
}

impl Unclaimed<'_> {
    /// The grant answered (with a token or an error): the flow goes on and accounts for it.
    fn settle(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unclaimed<'_> {
    fn drop(&mut self) {
        self.stats.user_orphaned();
        tracing::warn!(
            user_id = self.user_id,
            "finAPI user created, but the request ended before its token was had: orphaned, \
             delete it"
        );
    }
}

impl Flows {
    /// Creates a user with the cached client token and returns that user's token. A user that
    /// was created but whose token cannot be had is logged and counted as orphaned; the caller
    /// gets a clean error, never a half result.
    pub(super) async fn access(
        &self,
        email: Option<Email>,
        phone: Option<Phone>,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<KycSession, FlowError> {
        let user = NewUser {
            id: generate_user_id(),
            password: generate_password()?,
            email: email.map(Email::into_string),
            phone: phone.map(Phone::into_string),
        };
        let user_id = self.create_user(&user, ctx, deadline).await?;
        let unclaimed = Unclaimed {
            stats: &self.stats,
            user_id: &user_id,
        };
        let result = self
            .user_token(&user_id, &user.password, ctx, deadline)
            .await;
        unclaimed.settle();
        let token = match result {
            Ok(token) => token,
            Err(err) => {
                // Counted here; logged once, with the user id and the cause, where the error
                // becomes the answer.
                self.stats.user_orphaned();
                return Err(FlowError::OrphanedUser {
                    user_id,
                    source: Box::new(err),
                });
            }
        };
        Ok(KycSession {
            access_token: token.token,
            token_type: token.token_type,
            expires_in: token.expires_in,
            flow: FlowKind::Access,
            user_id: Some(user_id),
        })
    }

    /// The client token, waited for at most until the deadline.
    async fn client_token(
        &self,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<Arc<ClientToken>, FlowError> {
        Ok(self
            .attempt(
                Step::ClientToken,
                deadline,
                self.tokens.get(&ctx.request_id),
            )
            .await??)
    }

    /// `POST /api/v2/users` with the cached client token.
    ///
    /// Retried on transient failures with the same id and password: when an earlier attempt
    /// may have created the user (its answer was lost, or finAPI failed while handling it),
    /// `ENTITY_EXISTS` means it did, since the id is a fresh random one, and the flow goes on;
    /// the password grant then proves the user is ours. A 401 means finAPI no longer accepts
    /// the client token: the call is made once more with the next one. A 401 creates no user,
    /// so that retry cannot duplicate one.
    async fn create_user(
        &self,
        user: &NewUser,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<String, FlowError> {
        let step = Step::CreateUser;
        let mut token = self.client_token(ctx, deadline).await?;
        let mut token_replaced = false;
        let mut maybe_created = false;
        let mut failed = 0;
        loop {
            let created = self
                .attempt(
                    step,
                    deadline,
                    self.access
                        .create_user(&token.token, user, &ctx.request_id, &ctx.end_user),
                )
                .await?;
            let err = match created {
                Ok(id) => return Ok(id),
                Err(err) => err,
            };
            if is_unauthorized(&err) {
                if token_replaced {
                    return Err(FlowError::ClientTokenRejected(err.into()));
                }
                tracing::debug!("client token refused; using the next one");
                token_replaced = true;
                token = self
                    .attempt(
                        Step::ClientToken,
                        deadline,
                        self.tokens.replace(&token, &ctx.request_id),
                    )
                    .await??;
                continue;
            }
            if maybe_created && err.code() == Some("ENTITY_EXISTS") {
                self.stats.user_found_on_retry();
                tracing::debug!(user_id = user.id, "user was created by a lost attempt");
                return Ok(user.id.clone());
            }
            failed += 1;
            maybe_created |= err.may_have_been_handled();
            if !self.back_off(step, failed, &err, deadline).await {
                if maybe_created {
                    tracing::warn!(
                        user_id = user.id,
                        "finAPI user may have been created by a lost attempt: check and delete it"
                    );
                }
                return Err(err.into());
            }
            token = self.client_token(ctx, deadline).await?;
        }
    }

    /// `grant_type=password`, retried on transient failures: a token call changes nothing at
    /// finAPI and answers the same token while it is valid.
    async fn user_token(
        &self,
        user_id: &str,
        password: &SecretString,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<AccessToken, FlowError> {
        self.with_retries(
            Step::UserToken,
            deadline,
            || {
                self.access
                    .user_token(user_id, password, &ctx.request_id, &ctx.end_user)
            },
            |_| {},
        )
        .await
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
