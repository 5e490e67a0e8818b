//! Use case 1: standalone GiroIdent through the Process Controller.

use secrecy::SecretString;

use crate::config::FlowKind;
use crate::finapi::Step;
use crate::resilience::Deadline;

use super::{ClientReference, FlowError, Flows, KycSession, RequestContext};

/// Exchanges whose answer may be lost before the session gives up: after a lost answer the
/// session starts again from a new process, once.
const MAX_LOST_EXCHANGES: u32 = 1;

impl Flows {
    /// Creates a process for the reference and exchanges its token, once, for the user token.
    /// When the exchange fails, a new process is started (each process token is exchanged at
    /// most once), at most once after a lost answer and at most `max_attempts` processes in
    /// all.
    pub(super) async fn standalone(
        &self,
        client_reference: &ClientReference,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<KycSession, FlowError> {
        let step = Step::ExchangeProcessToken;
        let up = self.upstream(ctx)?;
        let mut processes = 0;
        let mut lost = 0;
        let mut reason = "";
        loop {
            let process_token = self.create_process(client_reference, ctx, deadline).await?;
            processes += 1;
            // Never retried: with invalidate=true the process token is spent by the first
            // exchange, so a second try could only fail, and with invalidate=false it would
            // count against the limit of ten. Whatever went wrong, this token is abandoned.
            // Each exchange after a restart counts as the step's next attempt.
            let call = up.processes.exchange_process_token(
                &process_token,
                self.invalidate_process_token,
                &ctx.request_id,
                &ctx.end_user,
            );
            let exchanged = self
                .attempt(
                    step,
                    deadline,
                    crate::finapi::as_attempt(processes, reason, call),
                )
                .await?;
            let err = match exchanged {
                Ok(access_token) => {
                    return Ok(KycSession {
                        access_token,
                        token_type: "bearer".to_owned(),
                        expires_in: None,
                        flow: FlowKind::Standalone,
                        user_id: None,
                        identity: None,
                    });
                }
                Err(err) => err,
            };
            // Starting again from a new process is safe: no token is exchanged twice, and the
            // abandoned process (spent or not) is deleted by finAPI. A lost answer may have
            // spent the token and bound a hidden user nobody will see, so that mess is made at
            // most once per session; refusals (5xx, 429, connect errors) up to max_attempts.
            if err.answer_lost() {
                if lost >= MAX_LOST_EXCHANGES {
                    return Err(err.into());
                }
                lost += 1;
            }
            if !self.back_off(step, processes, &err, deadline).await {
                return Err(err.into());
            }
            reason = err.outcome();
            self.stats.process_restarted();
            self.stats.process_possibly_abandoned();
        }
    }

    /// `POST /api/v1/processes`, retried on transient failures. A retry after an unknown
    /// outcome may leave one unused process behind; finAPI deletes it when its validity ends,
    /// it holds no user data, and it is counted. Nothing else can go wrong: the caller gets the
    /// token of the process that answered.
    async fn create_process(
        &self,
        client_reference: &ClientReference,
        ctx: &RequestContext,
        deadline: &Deadline,
    ) -> Result<SecretString, FlowError> {
        let up = self.upstream(ctx)?;
        self.with_retries(
            Step::CreateProcess,
            deadline,
            || {
                up.processes.create_process(
                    client_reference.as_str(),
                    &up.process_id,
                    &ctx.request_id,
                    &ctx.end_user,
                )
            },
            |err| {
                if err.may_have_been_handled() {
                    self.stats.process_possibly_abandoned();
                }
            },
        )
        .await
    }
}
