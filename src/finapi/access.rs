//! finAPI Access: OAuth tokens and users (`/api/v2`).

use std::sync::Arc;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HOST, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::resilience::CircuitBreaker;

use super::{
    AccessToken, ClientCredentials, EndUserMetadata, InvalidBaseUrl, NewUser, SecretVersion, Step,
    TokenBody, UpstreamError, decode, endpoint, host_header, send,
};

/// Client of finAPI Access. Cheap to clone: the HTTP connection pool is shared.
#[derive(Clone)]
pub struct AccessClient {
    http: reqwest::Client,
    token_url: reqwest::Url,
    users_url: reqwest::Url,
    host: HeaderValue,
    credentials: Arc<ClientCredentials>,
    breaker: Arc<CircuitBreaker>,
    /// Whether calls carry `traceparent` (`tracing.propagate_to_finapi`).
    propagate_trace: bool,
}

impl AccessClient {
    /// A client for the Access service at `base_url`, acting as the given finAPI client, its
    /// calls guarded by `breaker`.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        credentials: Arc<ClientCredentials>,
        breaker: Arc<CircuitBreaker>,
    ) -> Result<Self, InvalidBaseUrl> {
        let token_url = endpoint(base_url, "/api/v2/oauth/token")?;
        Ok(Self {
            http,
            host: host_header(&token_url)?,
            token_url,
            users_url: endpoint(base_url, "/api/v2/users")?,
            credentials,
            breaker,
            propagate_trace: false,
        })
    }

    /// Makes the calls carry the W3C `traceparent` of their span while spans are exported
    /// (`tracing.propagate_to_finapi`; off by default: trace ids would reach a third party).
    pub fn propagating_trace(mut self, on: bool) -> Self {
        self.propagate_trace = on;
        self
    }

    /// The circuit breaker guarding this service.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The finAPI client id this client acts as.
    pub fn client_id(&self) -> &str {
        &self.credentials.client_id
    }

    /// `grant_type=client_credentials`: a client token. It serves every caller, so it never
    /// carries an end user's metadata.
    pub async fn client_token(&self, request_id: &str) -> Result<AccessToken, UpstreamError> {
        self.token(
            Step::ClientToken,
            &[("grant_type", "client_credentials")],
            request_id,
            None,
        )
        .await
    }

    /// `grant_type=password`: a token for the given user, made on that user's behalf.
    pub async fn user_token(
        &self,
        user_id: &str,
        password: &SecretString,
        request_id: &str,
        end_user: &EndUserMetadata,
    ) -> Result<AccessToken, UpstreamError> {
        let params = [
            ("grant_type", "password"),
            ("username", user_id),
            ("password", password.expose_secret()),
        ];
        self.token(Step::UserToken, &params, request_id, Some(end_user))
            .await
    }

    async fn token(
        &self,
        step: Step,
        params: &[(&str, &str)],
        request_id: &str,
        end_user: Option<&EndUserMetadata>,
    ) -> Result<AccessToken, UpstreamError> {
        self.credentials
            .with_secret(|secret| self.token_call(step, params, secret, request_id, end_user))
            .await
    }

    async fn token_call(
        &self,
        step: Step,
        params: &[(&str, &str)],
        secret: Arc<SecretVersion>,
        request_id: &str,
        end_user: Option<&EndUserMetadata>,
    ) -> Result<AccessToken, UpstreamError> {
        let form = form_urlencoded::Serializer::new(String::with_capacity(256))
            .extend_pairs(params)
            .append_pair("client_id", &self.credentials.client_id)
            .append_pair("client_secret", secret.secret().expose_secret())
            .finish();
        let request = self
            .http
            .post(self.token_url.clone())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form);
        let request = match end_user {
            Some(end_user) => end_user.apply(request),
            None => request,
        };
        let body = send(
            &self.breaker,
            self.propagate_trace,
            step,
            request,
            request_id,
            StatusCode::OK,
        )
        .await?;
        decode::<TokenBody>(step, &body)?.into_token(step)
    }

    /// `POST /api/v2/users` with a client token, on behalf of the end user who will be `user`.
    /// Returns the id finAPI stored.
    pub async fn create_user(
        &self,
        client_token: &SecretString,
        user: &NewUser,
        request_id: &str,
        end_user: &EndUserMetadata,
    ) -> Result<String, UpstreamError> {
        let body = CreateUserBody {
            id: &user.id,
            password: user.password.expose_secret(),
            email: user.email.as_deref(),
            phone: user.phone.as_deref(),
            is_auto_update_enabled: false,
        };
        let request = self
            .http
            .post(self.users_url.clone())
            .header(HOST, self.host.clone())
            .bearer_auth(client_token.expose_secret())
            .json(&body);
        let request = end_user.apply(request);
        let body = send(
            &self.breaker,
            self.propagate_trace,
            Step::CreateUser,
            request,
            request_id,
            StatusCode::CREATED,
        )
        .await?;
        // The answer repeats the password in plain text; only the id is read from it.
        checked_user_id(
            Step::CreateUser,
            decode::<CreatedUser>(Step::CreateUser, &body)?.id,
        )
    }

    /// `GET /api/v2/users`: the id of the user the token belongs to.
    pub async fn current_user_id(
        &self,
        user_token: &SecretString,
        request_id: &str,
    ) -> Result<String, UpstreamError> {
        let request = self
            .http
            .get(self.users_url.clone())
            .header(HOST, self.host.clone())
            .bearer_auth(user_token.expose_secret());
        let step = Step::GetUser;
        let body = send(
            &self.breaker,
            self.propagate_trace,
            step,
            request,
            request_id,
            StatusCode::OK,
        )
        .await?;
        checked_user_id(step, decode::<CreatedUser>(step, &body)?.id)
    }

    /// `DELETE /api/v2/users`: deletes the user the token belongs to.
    pub async fn delete_user(
        &self,
        user_token: &SecretString,
        request_id: &str,
        end_user: &EndUserMetadata,
    ) -> Result<(), UpstreamError> {
        let request = end_user.apply(
            self.http
                .delete(self.users_url.clone())
                .header(HOST, self.host.clone())
                .bearer_auth(user_token.expose_secret()),
        );
        send(
            &self.breaker,
            self.propagate_trace,
            Step::DeleteUser,
            request,
            request_id,
            StatusCode::OK,
        )
        .await?;
        Ok(())
    }
}

/// A user id finAPI's rules allow (1 to 36 characters of `A-Z a-z 0-9 - _ . + @`): it goes back
/// to the caller, into logs and into the ledger.
fn checked_user_id(step: Step, id: String) -> Result<String, UpstreamError> {
    let valid = (1..=36).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+@".contains(&b));
    if valid {
        Ok(id)
    } else {
        Err(UpstreamError::Protocol {
            step,
            detail: "a user id outside finAPI's rules",
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateUserBody<'a> {
    id: &'a str,
    password: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<&'a str>,
    is_auto_update_enabled: bool,
}

#[derive(Deserialize)]
struct CreatedUser {
    id: String,
}
