//! Use case 1: standalone GiroIdent through the Process Controller.

use crate::config::FlowKind;

use super::{
    ClientReference, FlowError, Flows, KycSession, RequestContext, classify_credentials_call,
};

impl Flows {
    /// Creates a process for the reference and exchanges its token, once, for the user token.
    pub(super) async fn standalone(
        &self,
        client_reference: &ClientReference,
        ctx: &RequestContext,
    ) -> Result<KycSession, FlowError> {
        let process_token = self
            .processes
            .create_process(client_reference.as_str(), &self.process_id, &ctx.request_id)
            .await
            .map_err(classify_credentials_call)?;
        // Exactly one exchange: with invalidate=true the process token is spent by it, so a
        // second try could only fail, and with invalidate=false it would count against the
        // limit of ten. A lost answer therefore ends the flow here.
        let access_token = self
            .processes
            .exchange_process_token(
                &process_token,
                self.invalidate_process_token,
                &ctx.request_id,
            )
            .await?;
        Ok(KycSession {
            access_token,
            token_type: "bearer".to_owned(),
            expires_in: None,
            flow: FlowKind::Standalone,
            user_id: None,
        })
    }
}
