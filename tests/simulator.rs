//! The finAPI simulator against `finapi-reference.md`, over a real socket.

use std::time::{Duration, Instant};

use giroident_broker::sim::{
    self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FaultRule, SimConfig, SimHandle,
};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

struct Sim {
    handle: SimHandle,
    http: reqwest::Client,
}

async fn sim() -> Sim {
    sim_with(SimConfig::default()).await
}

async fn sim_with(config: SimConfig) -> Sim {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let handle = sim::start(config).await.expect("simulator starts");
    Sim {
        handle,
        http: reqwest::Client::new(),
    }
}

fn fault(endpoint: &str) -> FaultRule {
    FaultRule {
        endpoint: endpoint.to_owned(),
        ..FaultRule::default()
    }
}

async fn body(response: Response) -> Value {
    response.json().await.expect("JSON body")
}

/// finAPI's answer schemas, written from the tables in `finapi-reference.md` ("Answer
/// schemas", finAPI's published Access V2 spec). A client generated from that spec rejects any
/// answer outside them, so every simulator answer is checked here.
mod finapi_schema {
    use serde_json::{Value, json};

    /// An Access token: 1 to 8192 visible ASCII characters.
    fn token() -> Value {
        json!({"type": "string", "minLength": 1, "maxLength": 8192, "pattern": "^[!-~]+$"})
    }

    /// AccessToken; `refresh_token` is present for the password grant only.
    pub fn token_answer(grant: &str) -> Value {
        let mut schema = json!({
            "type": "object",
            "required": ["access_token", "token_type", "expires_in", "scope"],
            "properties": {
                "access_token": token(),
                "token_type": {"const": "bearer"},
                "expires_in": {"type": "integer", "minimum": 0},
                "scope": {"const": "all"},
                "refresh_token": {"type": "string", "minLength": 1, "maxLength": 8192},
            },
            "additionalProperties": false,
        });
        if grant == "password" {
            schema["required"]
                .as_array_mut()
                .expect("required")
                .push(json!("refresh_token"));
        } else {
            schema["not"] = json!({"required": ["refresh_token"]});
        }
        schema
    }

    /// User; the password is `XXXXX` except in the creation answer.
    pub fn user_answer(created: bool) -> Value {
        let password = if created {
            json!({"type": "string", "minLength": 6, "maxLength": 128})
        } else {
            json!({"const": "XXXXX"})
        };
        json!({
            "type": "object",
            "required": ["id", "password", "isAutoUpdateEnabled"],
            "properties": {
                "id": {"type": "string", "minLength": 1, "maxLength": 36},
                "password": password,
                "email": {"type": ["string", "null"], "maxLength": 320},
                "phone": {"type": ["string", "null"], "maxLength": 50},
                "isAutoUpdateEnabled": {"type": "boolean"},
            },
            "additionalProperties": false,
        })
    }

    /// ErrorMessage with its ErrorDetails.
    pub fn error_message() -> Value {
        json!({
            "type": "object",
            "required": ["errors", "date", "requestId", "endpoint", "authContext"],
            "properties": {
                "errors": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["code", "type"],
                        "properties": {
                            "message": {"type": ["string", "null"]},
                            "code": {"enum": ["BAD_REQUEST", "ENTITY_EXISTS", "ILLEGAL_FIELD_VALUE",
                                "UNAUTHORIZED_ACCESS", "UNKNOWN_ENTITY", "LOCKED", "UNEXPECTED_ERROR"]},
                            "type": {"enum": ["BUSINESS", "TECHNICAL"]},
                        },
                        "additionalProperties": false,
                    },
                },
                "date": {
                    "type": "string",
                    "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}(Z|[+-][0-9]{2}:[0-9]{2})$",
                },
                "requestId": {"type": "string", "minLength": 1, "maxLength": 255},
                "endpoint": {
                    "type": "string",
                    "pattern": "^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /[!-~]*$",
                },
                "authContext": {"type": "string"},
                "bank": {"type": "string"},
            },
            "additionalProperties": false,
        })
    }

    /// The OAuth error shape of authentication errors.
    pub fn oauth_error() -> Value {
        json!({
            "type": "object",
            "required": ["error", "error_description"],
            "properties": {
                "error": {"enum": ["invalid_client", "invalid_token"]},
                "error_description": {"type": "string"},
            },
            "additionalProperties": false,
        })
    }

    /// The answer of `POST /api/v1/processes`.
    pub fn processes_answer() -> Value {
        json!({
            "type": "object",
            "required": ["processes"],
            "properties": {"processes": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["clientReference", "processToken"],
                    "properties": {
                        "clientReference": {"type": "string", "minLength": 1},
                        "processToken": {
                            "type": "string",
                            "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
                        },
                    },
                    "additionalProperties": false,
                },
            }},
            "additionalProperties": false,
        })
    }

    /// The answer of a process token exchange: an Access user token, no lifetime.
    pub fn exchange_answer() -> Value {
        json!({
            "type": "object",
            "required": ["accessToken"],
            "properties": {"accessToken": token()},
            "additionalProperties": false,
        })
    }

    /// Panics with every violation when `body` does not match `schema`.
    pub fn assert_matches(schema: &Value, body: &Value, what: &str) {
        let validator = jsonschema::validator_for(schema).expect("a valid schema");
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{what}: {body} breaks finAPI's schema: {errors:?}"
        );
    }
}

/// Asserts an ErrorMessage with `status` and `code` in finAPI's schema and returns its body.
async fn assert_error(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let body = body(response).await;
    finapi_schema::assert_matches(&finapi_schema::error_message(), &body, "ErrorMessage");
    assert_eq!(body["errors"][0]["code"], code, "{body}");
    body
}

async fn assert_oauth_error(response: Response, error: &str) {
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = body(response).await;
    finapi_schema::assert_matches(&finapi_schema::oauth_error(), &body, "OAuth error");
    assert_eq!(body["error"], error);
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.base_url())
    }

    /// A token request with the demo client's credentials and `params`.
    async fn token(&self, params: &[(&str, &str)]) -> Response {
        let mut form = vec![
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", DEMO_CLIENT_SECRET),
        ];
        form.extend_from_slice(params);
        self.token_raw(&form).await
    }

    async fn token_raw(&self, form: &[(&str, &str)]) -> Response {
        self.http
            .post(self.url("/api/v2/oauth/token"))
            .form(form)
            .send()
            .await
            .expect("token request")
    }

    async fn client_token(&self) -> Value {
        let response = self.token(&[("grant_type", "client_credentials")]).await;
        assert_eq!(response.status(), StatusCode::OK);
        body(response).await
    }

    async fn client_access_token(&self) -> String {
        access_token(&self.client_token().await)
    }

    async fn password_grant(&self, username: &str, password: &str) -> Response {
        self.token(&[
            ("grant_type", "password"),
            ("username", username),
            ("password", password),
        ])
        .await
    }

    async fn create_user(&self, bearer: &str, user: Value) -> Response {
        self.http
            .post(self.url("/api/v2/users"))
            .bearer_auth(bearer)
            .json(&user)
            .send()
            .await
            .expect("create user")
    }

    /// Creates a user with `id` and `password` and logs it in; returns the token response.
    async fn user_login(&self, id: &str, password: &str) -> Value {
        let client = self.client_access_token().await;
        let created = self
            .create_user(&client, json!({"id": id, "password": password}))
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
        let response = self.password_grant(id, password).await;
        assert_eq!(response.status(), StatusCode::OK);
        body(response).await
    }

    async fn users(&self, method: reqwest::Method, bearer: &str) -> Response {
        self.http
            .request(method, self.url("/api/v2/users"))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("users request")
    }

    async fn create_processes_raw(&self, body: Value) -> Response {
        self.http
            .post(self.url("/api/v1/processes"))
            .json(&body)
            .send()
            .await
            .expect("create processes")
    }

    /// Creates one process per reference; returns the process tokens.
    async fn create_processes(&self, references: &[&str]) -> Vec<String> {
        let references: Vec<Value> = references
            .iter()
            .map(|reference| json!({"clientReference": reference}))
            .collect();
        let response = self
            .create_processes_raw(json!({
                "clientId": DEMO_CLIENT_ID, "clientSecret": DEMO_CLIENT_SECRET,
                "clientReferences": references, "processId": "GIROIDENT",
            }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body = body(response).await;
        let processes = body["processes"].as_array().expect("processes");
        assert_eq!(processes.len(), references.len());
        processes
            .iter()
            .zip(&references)
            .map(|(process, reference)| {
                assert_eq!(process["clientReference"], reference["clientReference"]);
                process["processToken"].as_str().expect("token").to_owned()
            })
            .collect()
    }

    async fn exchange(&self, process_token: &str, invalidate: bool) -> Response {
        self.http
            .get(self.url(&format!(
                "/api/v1/processes/{process_token}?invalidate={invalidate}"
            )))
            .send()
            .await
            .expect("exchange")
    }

    async fn exchanged_token(&self, process_token: &str, invalidate: bool) -> String {
        let response = self.exchange(process_token, invalidate).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = body(response).await;
        assert!(body.get("expires_in").is_none());
        body["accessToken"]
            .as_str()
            .expect("accessToken")
            .to_owned()
    }

    async fn admin(&self, method: reqwest::Method, path: &str) -> Response {
        self.http
            .request(method, self.url(path))
            .send()
            .await
            .expect("admin request")
    }
}

fn access_token(token_response: &Value) -> String {
    token_response["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

#[tokio::test]
async fn processes_are_created_per_reference_and_exchange_for_user_tokens() {
    let sim = sim().await;
    let tokens = sim.create_processes(&["customer-1", "customer-2"]).await;
    assert_ne!(tokens[0], tokens[1]);
    let user_token = sim.exchanged_token(&tokens[0], false).await;
    assert!(user_token.len() >= 64);
    assert_eq!(
        sim.users(reqwest::Method::GET, &user_token).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        sim.users(reqwest::Method::DELETE, &user_token)
            .await
            .status(),
        StatusCode::OK
    );
    assert_error(
        sim.exchange(&tokens[0], false).await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
    sim.exchanged_token(&tokens[1], false).await;
}

#[tokio::test]
async fn exchange_with_invalidate_blocks_further_exchanges() {
    let sim = sim().await;
    let [token] = sim.create_processes(&["c"]).await.try_into().unwrap();
    sim.exchanged_token(&token, true).await;
    let refused = sim.exchange(&token, false).await;
    let body = assert_error(refused, StatusCode::NOT_FOUND, "UNKNOWN_ENTITY").await;
    assert_eq!(body["endpoint"], "GET /api/v1/processes/{processToken}");
}

#[tokio::test]
async fn eleventh_exchange_is_unknown_entity_and_repeats_return_the_valid_token() {
    let sim = sim().await;
    let [token] = sim.create_processes(&["c"]).await.try_into().unwrap();
    let first = sim.exchanged_token(&token, false).await;
    for _ in 1..10 {
        assert_eq!(sim.exchanged_token(&token, false).await, first);
    }
    assert_error(
        sim.exchange(&token, false).await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
    assert_error(
        sim.exchange("no-such-process", false).await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
}

#[tokio::test]
async fn process_tokens_expire() {
    let sim = sim_with(SimConfig {
        process_token_ttl: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let [token] = sim.create_processes(&["c"]).await.try_into().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_error(
        sim.exchange(&token, false).await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
}

#[tokio::test]
async fn an_undecodable_process_token_is_an_unknown_entity() {
    let sim = sim().await;
    let response = reqwest::get(sim.url("/api/v1/processes/%FF?invalidate=true"))
        .await
        .unwrap();
    assert_error(response, StatusCode::NOT_FOUND, "UNKNOWN_ENTITY").await;
}

#[tokio::test]
async fn process_creation_checks_client_and_fields() {
    let sim = sim().await;
    let valid = json!({"clientId": DEMO_CLIENT_ID, "clientSecret": DEMO_CLIENT_SECRET,
        "clientReferences": [{"clientReference": "c"}], "processId": "USER_ONLY"});
    assert_eq!(
        sim.create_processes_raw(valid.clone()).await.status(),
        StatusCode::CREATED
    );
    let mut wrong_secret = valid.clone();
    wrong_secret["clientSecret"] = json!("wrong");
    assert_oauth_error(
        sim.create_processes_raw(wrong_secret).await,
        "invalid_client",
    )
    .await;
    for (field, value) in [
        ("processId", json!("OTHER")),
        ("processId", Value::Null),
        ("clientReferences", json!([])),
        ("clientReferences", json!("c")),
        ("clientId", Value::Null),
    ] {
        let mut invalid = valid.clone();
        invalid[field] = value;
        assert_error(
            sim.create_processes_raw(invalid).await,
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        )
        .await;
    }
}

#[tokio::test]
async fn bad_client_credentials_get_invalid_client() {
    let sim = sim().await;
    for form in [
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", "wrong"),
        ],
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", "unknown"),
            ("client_secret", DEMO_CLIENT_SECRET),
        ],
        vec![("grant_type", "client_credentials")],
    ] {
        assert_oauth_error(sim.token_raw(&form).await, "invalid_client").await;
    }
}

#[tokio::test]
async fn client_credentials_return_the_same_token_while_valid() {
    let sim = sim().await;
    let first = sim.client_token().await;
    assert_eq!(first["token_type"], "bearer");
    assert_eq!(first["scope"], "all");
    assert!(first.get("refresh_token").is_none());
    assert!(access_token(&first).len() >= 64);
    let first_expiry = first["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&first_expiry));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = sim.client_token().await;
    assert_eq!(access_token(&second), access_token(&first));
    assert!(second["expires_in"].as_u64().unwrap() <= first_expiry);
}

#[tokio::test]
async fn zero_lifetime_tokens_report_expires_in_zero() {
    let sim = sim_with(SimConfig {
        client_token_ttl: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    assert_eq!(sim.client_token().await["expires_in"], 0);
}

#[tokio::test]
async fn expired_client_token_is_rejected_and_replaced() {
    let sim = sim_with(SimConfig {
        client_token_ttl: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let first = sim.client_token().await;
    assert_eq!(first["expires_in"], 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_oauth_error(
        sim.create_user(&access_token(&first), json!({})).await,
        "invalid_token",
    )
    .await;
    let second = sim.client_access_token().await;
    assert_ne!(second, access_token(&first));
    assert_eq!(
        sim.create_user(&second, json!({})).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn password_and_refresh_grants_issue_user_tokens() {
    let sim = sim().await;
    let login = sim.user_login("alice", "secret-1").await;
    let refresh = login["refresh_token"].as_str().expect("refresh_token");
    assert_eq!(login["token_type"], "bearer");
    let again = body(sim.password_grant("ALICE", "secret-1").await).await;
    assert_eq!(again["access_token"], login["access_token"]);
    assert_eq!(again["refresh_token"], login["refresh_token"]);

    let refreshed = sim
        .token(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])
        .await;
    assert_eq!(refreshed.status(), StatusCode::OK);
    let refreshed = body(refreshed).await;
    assert!(refreshed.get("refresh_token").is_none());
    let user = sim
        .users(reqwest::Method::GET, &access_token(&refreshed))
        .await;
    assert_eq!(body(user).await["id"], "alice");

    for response in [
        sim.password_grant("alice", "wrong-password").await,
        sim.password_grant("nobody", "secret-1").await,
        sim.token(&[("grant_type", "refresh_token"), ("refresh_token", "nope")])
            .await,
    ] {
        assert_error(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
}

#[tokio::test]
async fn unsupported_or_missing_grant_is_bad_request() {
    let sim = sim().await;
    assert_error(
        sim.token(&[("grant_type", "implicit")]).await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    )
    .await;
    let missing = assert_error(sim.token(&[]).await, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    assert_eq!(missing["endpoint"], "POST /api/v2/oauth/token");
}

#[tokio::test]
async fn user_creation_validates_every_field() {
    let sim = sim().await;
    let client = sim.client_access_token().await;
    let created = sim
        .create_user(
            &client,
            json!({"email": "a@example.com", "isAutoUpdateEnabled": true}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created = body(created).await;
    assert!(created["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(created["password"].as_str().is_some_and(|p| p.len() >= 6));
    assert_eq!(created["email"], "a@example.com");
    assert_eq!(created["phone"], Value::Null);
    assert_eq!(created["isAutoUpdateEnabled"], true);

    let long = |n: usize| "a".repeat(n);
    for invalid in [
        json!({"id": "no spaces"}),
        json!({"id": "ümlaut"}),
        json!({"id": ""}),
        json!({"id": long(37)}),
        json!({"password": "12345"}),
        json!({"password": long(129)}),
        json!({"email": long(321)}),
        json!({"phone": long(51)}),
        json!({"isAutoUpdateEnabled": "yes"}),
        json!(["not", "an", "object"]),
    ] {
        assert_error(
            sim.create_user(&client, invalid).await,
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        )
        .await;
    }
    let edge = json!({"id": format!("A-_.+@{}", long(30)), "password": long(128),
        "email": long(320), "phone": long(50)});
    assert_eq!(
        sim.create_user(&client, edge).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn duplicate_user_id_is_entity_exists_case_insensitively() {
    let sim = sim().await;
    let client = sim.client_access_token().await;
    let created = sim.create_user(&client, json!({"id": "Bob.Smith"})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let duplicate = sim.create_user(&client, json!({"id": "bob.smith"})).await;
    let body = assert_error(duplicate, StatusCode::UNPROCESSABLE_ENTITY, "ENTITY_EXISTS").await;
    assert_eq!(body["endpoint"], "POST /api/v2/users");
}

#[tokio::test]
async fn endpoints_demand_the_right_kind_of_token() {
    let sim = sim().await;
    let user = access_token(&sim.user_login("carol", "secret-1").await);
    let client = sim.client_access_token().await;
    assert_error(
        sim.create_user(&user, json!({})).await,
        StatusCode::FORBIDDEN,
        "UNAUTHORIZED_ACCESS",
    )
    .await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        assert_error(
            sim.users(method.clone(), &client).await,
            StatusCode::FORBIDDEN,
            "UNAUTHORIZED_ACCESS",
        )
        .await;
        assert_oauth_error(sim.users(method, "not-a-token").await, "invalid_token").await;
    }
    let anonymous = sim.http.get(sim.url("/api/v2/users")).send().await.unwrap();
    assert_oauth_error(anonymous, "invalid_token").await;
}

#[tokio::test]
async fn get_user_masks_the_password() {
    let sim = sim().await;
    let user = access_token(&sim.user_login("dave", "secret-1").await);
    let response = sim.users(reqwest::Method::GET, &user).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = body(response).await;
    assert_eq!(body["id"], "dave");
    assert_eq!(body["password"], "XXXXX");
}

#[tokio::test]
async fn deleting_a_user_invalidates_its_tokens() {
    let sim = sim().await;
    let login = sim.user_login("erin", "secret-1").await;
    let user = access_token(&login);
    let deleted = sim.users(reqwest::Method::DELETE, &user).await;
    assert_eq!(deleted.status(), StatusCode::OK);
    assert!(deleted.bytes().await.unwrap().is_empty());
    assert_oauth_error(
        sim.users(reqwest::Method::GET, &user).await,
        "invalid_token",
    )
    .await;
    let refresh = login["refresh_token"].as_str().unwrap();
    assert_error(
        sim.token(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])
            .await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    )
    .await;
}

#[tokio::test]
async fn request_ids_are_echoed_generated_and_limited() {
    let sim = sim().await;
    let echoed = sim
        .http
        .get(sim.url("/api/v2/users"))
        .header("X-Request-Id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-42");
    assert_eq!(body(echoed).await["error"], "invalid_token");

    let generated = sim.admin(reqwest::Method::GET, "/__sim/stats").await;
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("selfgen-"), "{id}");

    let too_long = sim
        .http
        .post(sim.url("/api/v2/users"))
        .header("X-Request-Id", "r".repeat(256))
        .send()
        .await
        .unwrap();
    let id = too_long.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = assert_error(too_long, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    assert_eq!(body["requestId"], id);

    let limit = "r".repeat(255);
    let accepted = sim
        .http
        .get(sim.url("/nowhere"))
        .header("X-Request-Id", &limit)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.headers()["x-request-id"], limit.as_str());
    assert_error(accepted, StatusCode::NOT_FOUND, "UNKNOWN_ENTITY").await;
}

#[tokio::test]
async fn stats_count_calls_by_endpoint_and_status() {
    let sim = sim().await;
    let client = sim.client_access_token().await;
    sim.create_user(&client, json!({"id": "frank"})).await;
    sim.create_user(&client, json!({"id": "frank"})).await;
    sim.token(&[("grant_type", "password"), ("username", "frank")])
        .await;
    sim.token(&[]).await;
    sim.admin(reqwest::Method::GET, "/__sim/faults").await;

    let stats = body(sim.admin(reqwest::Method::GET, "/__sim/stats").await).await;
    assert_eq!(
        stats,
        json!({
            "POST /api/v2/oauth/token client_credentials": {"200": 1},
            "POST /api/v2/oauth/token password": {"400": 1},
            "POST /api/v2/oauth/token": {"400": 1},
            "POST /api/v2/users": {"201": 1, "422": 1},
        })
    );
    assert_eq!(serde_json::to_value(sim.handle.stats()).unwrap(), stats);
    let reset = sim.admin(reqwest::Method::DELETE, "/__sim/stats").await;
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert!(sim.handle.stats().is_empty());
}

#[tokio::test]
async fn injected_status_answers_in_finapi_shape_with_retry_after() {
    let sim = sim().await;
    sim.handle.add_fault(FaultRule {
        status: Some(503),
        retry_after: Some(7),
        ..fault("POST /api/v2/oauth/token")
    });
    let response = sim.token(&[("grant_type", "client_credentials")]).await;
    assert_eq!(response.headers()["retry-after"], "7");
    let body = assert_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "UNEXPECTED_ERROR",
    )
    .await;
    assert_eq!(body["errors"][0]["type"], "TECHNICAL");

    sim.handle.clear_faults();
    sim.handle.add_fault(FaultRule {
        status: Some(401),
        ..fault("*")
    });
    let client_error = sim.token(&[("grant_type", "client_credentials")]).await;
    assert_oauth_error(client_error, "invalid_client").await;
    assert_oauth_error(sim.users(reqwest::Method::GET, "t").await, "invalid_token").await;
    assert_eq!(
        sim.handle.stats()["POST /api/v2/oauth/token client_credentials"]["503"],
        1
    );
}

#[tokio::test]
async fn counted_fault_is_spent_after_n_calls() {
    let sim = sim().await;
    sim.handle.add_fault(FaultRule {
        status: Some(500),
        count: Some(2),
        ..fault("POST /api/v2/oauth/token client_credentials")
    });
    for _ in 0..2 {
        let response = sim.token(&[("grant_type", "client_credentials")]).await;
        assert_error(
            response,
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNEXPECTED_ERROR",
        )
        .await;
    }
    sim.client_token().await;
    let rules = body(sim.admin(reqwest::Method::GET, "/__sim/faults").await).await;
    assert_eq!(rules, json!([]));
}

#[tokio::test]
async fn latency_fault_delays_the_answer() {
    let sim = sim().await;
    sim.handle.add_fault(FaultRule {
        latency_ms: Some(300),
        ..fault("GET /api/v2/users")
    });
    let started = Instant::now();
    sim.users(reqwest::Method::GET, "t").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    sim.client_token().await;
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn dropped_connection_is_a_transport_error() {
    let sim = sim().await;
    sim.handle.add_fault(FaultRule {
        drop_connection: true,
        count: Some(1),
        ..fault("POST /api/v2/oauth/token")
    });
    let dropped = sim
        .http
        .post(sim.url("/api/v2/oauth/token"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await;
    assert!(dropped.is_err(), "expected a transport error: {dropped:?}");
    sim.client_token().await;
    assert_eq!(
        sim.handle.stats()["POST /api/v2/oauth/token client_credentials"],
        [("dropped".to_owned(), 1), ("200".to_owned(), 1)]
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn drop_after_handling_changes_state_but_loses_the_answer() {
    let sim = sim().await;
    let client = sim.client_access_token().await;
    sim.handle.add_fault(FaultRule {
        drop_after_handling: true,
        count: Some(1),
        ..fault("POST /api/v2/users")
    });
    let lost = sim
        .http
        .post(sim.url("/api/v2/users"))
        .bearer_auth(&client)
        .json(&json!({"id": "gina"}))
        .send()
        .await;
    assert!(lost.is_err(), "expected a transport error: {lost:?}");
    assert_error(
        sim.create_user(&client, json!({"id": "gina"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "ENTITY_EXISTS",
    )
    .await;
}

#[tokio::test]
async fn revoked_tokens_are_rejected() {
    let sim = sim().await;
    let login = sim.user_login("hank", "secret-1").await;
    let client = sim.client_access_token().await;
    sim.handle.revoke_all_tokens();
    assert_oauth_error(sim.create_user(&client, json!({})).await, "invalid_token").await;
    assert_oauth_error(
        sim.users(reqwest::Method::GET, &access_token(&login)).await,
        "invalid_token",
    )
    .await;
    assert_ne!(sim.client_access_token().await, client);

    let user = access_token(&body(sim.password_grant("hank", "secret-1").await).await);
    let revoked = sim
        .admin(reqwest::Method::POST, "/__sim/revoke-tokens")
        .await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_oauth_error(
        sim.users(reqwest::Method::GET, &user).await,
        "invalid_token",
    )
    .await;
}

#[tokio::test]
async fn a_changed_client_secret_revokes_the_client_tokens_but_not_the_user_tokens() {
    let sim = sim().await;
    let login = sim.user_login("ida", "secret-1").await;
    let client = sim.client_access_token().await;
    let change = |client_id: &str, body: Value| {
        sim.http
            .post(sim.url(&format!("/__sim/clients/{client_id}/secret")))
            .json(&body)
            .send()
    };
    let changed = change(DEMO_CLIENT_ID, json!({"clientSecret": "rotated-secret"}))
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::NO_CONTENT);
    // finAPI reference, "Client secret rotation": client tokens revoked, user tokens valid.
    assert_oauth_error(sim.create_user(&client, json!({})).await, "invalid_token").await;
    assert_eq!(
        sim.users(reqwest::Method::GET, &access_token(&login))
            .await
            .status(),
        StatusCode::OK
    );
    // The old secret is refused by both services, the new one accepted.
    assert_oauth_error(
        sim.token(&[("grant_type", "client_credentials")]).await,
        "invalid_client",
    )
    .await;
    assert_oauth_error(
        sim.create_processes_raw(json!({
            "clientId": DEMO_CLIENT_ID, "clientSecret": DEMO_CLIENT_SECRET,
            "clientReferences": [{"clientReference": "r-1"}], "processId": "GIROIDENT",
        }))
        .await,
        "invalid_client",
    )
    .await;
    let fresh = sim
        .token_raw(&[
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", "rotated-secret"),
        ])
        .await;
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_ne!(access_token(&body(fresh).await), client);

    let unknown = change("nobody", json!({"clientSecret": "x"}))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let empty = change(DEMO_CLIENT_ID, json!({"clientSecret": ""}))
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn admin_fault_api_validates_lists_and_clears() {
    let sim = sim().await;
    let add = |rule: Value| sim.http.post(sim.url("/__sim/faults")).json(&rule).send();
    let rule = json!({"endpoint": "GET /api/v2/users", "status": 429, "retryAfter": 1,
        "probability": 1.0, "count": 3});
    assert_eq!(
        add(rule.clone()).await.unwrap().status(),
        StatusCode::CREATED
    );
    for invalid in [
        json!({"endpoint": "GET /elsewhere", "status": 500}),
        json!({"endpoint": "*", "status": 200}),
        json!({"endpoint": "*"}),
        json!({"endpoint": "*", "status": 500, "probability": 2.0}),
        json!({"endpoint": "*", "status": 500, "unknownField": 1}),
        json!("not a rule"),
    ] {
        let response = add(invalid).await.unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    }
    let listed = body(sim.admin(reqwest::Method::GET, "/__sim/faults").await).await;
    assert_eq!(listed[0]["endpoint"], "GET /api/v2/users");
    assert_eq!(listed[0]["count"], 3);
    let limited = sim.users(reqwest::Method::GET, "t").await;
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_error(limited, StatusCode::TOO_MANY_REQUESTS, "UNEXPECTED_ERROR").await;

    let cleared = sim.admin(reqwest::Method::DELETE, "/__sim/faults").await;
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    assert!(!sim.handle.stats().contains_key("GET /__sim/faults"));
    assert_eq!(
        body(sim.admin(reqwest::Method::GET, "/__sim/faults").await).await,
        json!([])
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_error_messages() {
    let sim = sim().await;
    let body = assert_error(
        sim.admin(reqwest::Method::GET, "/api/v3/anything").await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
    assert_eq!(body["endpoint"], "GET /api/v3/anything");
    assert_error(
        sim.admin(reqwest::Method::PUT, "/api/v2/users").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "BAD_REQUEST",
    )
    .await;
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = sim().await;
    let url = sim.url("/__sim/stats");
    sim.handle.shutdown().await;
    assert!(reqwest::get(url).await.is_err());
}

#[tokio::test]
async fn dropped_connection_sends_not_a_single_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sim = sim().await;
    sim.handle.add_fault(FaultRule {
        drop_connection: true,
        ..fault("*")
    });
    let mut stream = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .unwrap();
    stream
        // `Connection: close`: without the fault, the answer ends the read instead of hanging.
        .write_all(b"GET /api/v2/users HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received).await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn every_kind_of_answer_matches_finapis_published_schemas() {
    use finapi_schema::*;
    // The schemas really check: today's finAPI clients refuse a null authContext.
    let null_context = json!({"errors": [{"code": "BAD_REQUEST", "type": "BUSINESS"}],
        "date": "2026-11-24T10:15:30.123+01:00", "requestId": "r", "endpoint": "GET /x",
        "authContext": null});
    assert!(!jsonschema::is_valid(&error_message(), &null_context));

    let sim = sim().await;
    let client = sim.client_token().await;
    assert_matches(&token_answer("client_credentials"), &client, "client token");
    let client = access_token(&client);

    let created = sim
        .create_user(
            &client,
            json!({"id": "erin", "password": "secret-1", "email": "e@x.de"}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_matches(&user_answer(true), &body(created).await, "created user");
    let login = body(sim.password_grant("erin", "secret-1").await).await;
    assert_matches(&token_answer("password"), &login, "password grant");
    let refreshed = sim
        .token(&[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                login["refresh_token"].as_str().expect("refresh_token"),
            ),
        ])
        .await;
    assert_eq!(refreshed.status(), StatusCode::OK);
    assert_matches(
        &token_answer("refresh_token"),
        &body(refreshed).await,
        "refresh grant",
    );
    let fetched = sim.users(reqwest::Method::GET, &access_token(&login)).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_matches(&user_answer(false), &body(fetched).await, "fetched user");

    let created = sim
        .create_processes_raw(json!({
            "clientId": DEMO_CLIENT_ID, "clientSecret": DEMO_CLIENT_SECRET,
            "clientReferences": [{"clientReference": "customer-4711"}], "processId": "GIROIDENT",
        }))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created = body(created).await;
    assert_matches(&processes_answer(), &created, "created processes");
    let process_token = created["processes"][0]["processToken"]
        .as_str()
        .expect("token");
    let exchanged = sim.exchange(process_token, true).await;
    assert_eq!(exchanged.status(), StatusCode::OK);
    assert_matches(&exchange_answer(), &body(exchanged).await, "exchange");

    // One ErrorMessage of every kind the simulator gives; assert_error checks the schema.
    let no_grant = assert_error(sim.token(&[]).await, StatusCode::BAD_REQUEST, "BAD_REQUEST").await;
    assert_eq!(no_grant["endpoint"], "POST /api/v2/oauth/token");
    let id = no_grant["requestId"].as_str().expect("requestId");
    assert!(
        id.strip_prefix("selfgen-")
            .is_some_and(|uuid| uuid::Uuid::parse_str(uuid).is_ok()),
        "{id}"
    );
    let echoed = sim
        .http
        .post(sim.url("/api/v2/users"))
        .bearer_auth(access_token(&login))
        .header("X-Request-Id", "req-4711")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let forbidden = assert_error(echoed, StatusCode::FORBIDDEN, "UNAUTHORIZED_ACCESS").await;
    assert_eq!(forbidden["requestId"], "req-4711");
    assert_eq!(forbidden["endpoint"], "POST /api/v2/users");
    assert_error(
        sim.exchange(process_token, true).await,
        StatusCode::NOT_FOUND,
        "UNKNOWN_ENTITY",
    )
    .await;
    assert_error(
        sim.admin(reqwest::Method::PUT, "/api/v2/users").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "BAD_REQUEST",
    )
    .await;
    assert_error(
        sim.create_user(&client, json!({"id": "ERIN"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "ENTITY_EXISTS",
    )
    .await;
    assert_error(
        sim.create_processes_raw(json!({})).await,
        StatusCode::BAD_REQUEST,
        "BAD_REQUEST",
    )
    .await;
    for (status, code) in [
        (StatusCode::LOCKED, "LOCKED"),
        (StatusCode::INTERNAL_SERVER_ERROR, "UNEXPECTED_ERROR"),
        (StatusCode::SERVICE_UNAVAILABLE, "UNEXPECTED_ERROR"),
    ] {
        sim.handle.clear_faults();
        sim.handle.add_fault(FaultRule {
            status: Some(status.as_u16()),
            ..fault("DELETE /api/v2/users")
        });
        assert_error(
            sim.users(reqwest::Method::DELETE, &access_token(&login))
                .await,
            status,
            code,
        )
        .await;
    }
    sim.handle.clear_faults();

    assert_oauth_error(
        sim.token_raw(&[("grant_type", "client_credentials"), ("client_id", "x")])
            .await,
        "invalid_client",
    )
    .await;
    assert_oauth_error(
        sim.users(reqwest::Method::GET, "not-a-token").await,
        "invalid_token",
    )
    .await;
}
