//! Use case 2: GiroIdent together with other finAPI products: the finAPI calls of an Access
//! user (`identities` records and reuses the users these calls make).

use std::sync::Arc;

use secrecy::SecretString;

use crate::finapi::{AccessToken, NewUser, Step, as_attempt};
use crate::resilience::Deadline;
use crate::token_cache::ClientToken;

use super::{FlowError, Flows, RequestContext, is_unauthorized};

impl Flows {
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
                self.upstream(ctx)?.tokens.get(&ctx.request_id),
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
    pub(super) async fn create_user(
        &self,
        user: &NewUser,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<String, FlowError> {
        let step = Step::CreateUser;
        let up = self.upstream(ctx)?;
        let mut token = self.client_token(ctx, deadline).await?;
        let mut token_replaced = false;
        let mut maybe_created = false;
        let mut failed = 0;
        let mut reason = "";
        loop {
            let call = up
                .access
                .create_user(&token.token, user, &ctx.request_id, &ctx.end_user);
            let created = self
                .attempt(step, deadline, as_attempt(failed + 1, reason, call))
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
                        up.tokens.replace(&token, &ctx.request_id),
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
            reason = err.outcome();
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
    pub(super) async fn user_token(
        &self,
        user_id: &str,
        password: &SecretString,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<AccessToken, FlowError> {
        let up = self.upstream(ctx)?;
        self.with_retries(
            Step::UserToken,
            deadline,
            || {
                up.access
                    .user_token(user_id, password, &ctx.request_id, &ctx.end_user)
            },
            |_| {},
        )
        .await
    }
}

/// A fresh user id: `gib-` and a version 7 UUID's 32 hex digits (36 characters, finAPI's
/// limit: 1..36 of `A-Z a-z 0-9 - _ . + @`). Version 7 (RFC 9562, section 5.7) starts with the
/// time in milliseconds, so the ledger's case-insensitive index on the user id grows at its end
/// instead of taking each insert on a random page (one WAL frame per page a commit touches);
/// its 74 other bits (a counter that keeps the ids of one process ascending, and random bits)
/// keep it unique. The id is no secret: the password derives from it under the password key.
pub(super) fn generate_user_id() -> String {
    format!("gib-{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_fit_finapi_rules_and_differ() {
        let a = generate_user_id();
        let b = generate_user_id();
        assert_ne!(a, b);
        assert!(a < b, "ids of one process ascend: {a} {b}");
        assert_eq!(a.len(), 36);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.+@".contains(&c))
        );
    }
}
