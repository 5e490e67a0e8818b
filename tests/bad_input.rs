//! Every kind of bad request answers with its documented status, `application/problem+json`
//! and a stable `code`, and never reaches finAPI.

mod common;

use common::*;
use giroident_broker::config::{CallerSettings, FlowKind};
use giroident_broker::sim::SimConfig;

/// One bad request and the answer it must get.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    api_key: Key,
    content_type: Option<&'static str>,
    body: Body,
    status: u16,
    code: &'static str,
}

enum Key {
    Valid,
    /// The key of the caller who may only run the access flow.
    AccessOnly,
    None,
    Raw(&'static str),
}

enum Body {
    Text(&'static str),
    Owned(String),
}

const JSON: Option<&str> = Some("application/json");
const ACCESS_ONLY_KEY: &str = "access-only-key-0123456789";

fn case(name: &'static str, body: &'static str, status: u16, code: &'static str) -> Case {
    Case {
        name,
        method: "POST",
        path: "/kyc-sessions",
        api_key: Key::Valid,
        content_type: JSON,
        body: Body::Text(body),
        status,
        code,
    }
}

fn owned(name: &'static str, body: String, status: u16, code: &'static str) -> Case {
    Case {
        body: Body::Owned(body),
        ..case(name, "", status, code)
    }
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        // Malformed and truncated JSON.
        case("not JSON at all", "flow=access", 400, "MALFORMED_JSON"),
        case("truncated object", r#"{"flow":"acc"#, 400, "MALFORMED_JSON"),
        case(
            "truncated after comma",
            r#"{"flow":"access","#,
            400,
            "MALFORMED_JSON",
        ),
        case("empty body", "", 400, "MALFORMED_JSON"),
        case(
            "trailing garbage",
            r#"{"flow":"access"} x"#,
            400,
            "MALFORMED_JSON",
        ),
        case("single quotes", "{'flow':'access'}", 400, "MALFORMED_JSON"),
        case(
            "invalid UTF-8 escape",
            r#"{"flow":"\ud800"}"#,
            400,
            "MALFORMED_JSON",
        ),
        // Wrong types and shapes.
        case(
            "array instead of object",
            r#"["access"]"#,
            400,
            "INVALID_BODY",
        ),
        case(
            "string instead of object",
            r#""access""#,
            400,
            "INVALID_BODY",
        ),
        case("null body", "null", 400, "INVALID_BODY"),
        case("flow as number", r#"{"flow":1}"#, 400, "INVALID_BODY"),
        case("flow as object", r#"{"flow":{}}"#, 400, "INVALID_BODY"),
        case(
            "clientReference as number",
            r#"{"flow":"standalone","clientReference":4711}"#,
            400,
            "INVALID_BODY",
        ),
        case(
            "email as array",
            r#"{"flow":"access","email":["a@b.c"]}"#,
            400,
            "INVALID_BODY",
        ),
        case(
            "phone as bool",
            r#"{"flow":"access","phone":true}"#,
            400,
            "INVALID_BODY",
        ),
        // Unknown fields and flows, missing fields.
        case(
            "unknown field",
            r#"{"flow":"access","password":"x"}"#,
            400,
            "INVALID_BODY",
        ),
        case("unknown flow", r#"{"flow":"video"}"#, 400, "INVALID_BODY"),
        case(
            "flow in upper case",
            r#"{"flow":"ACCESS"}"#,
            400,
            "INVALID_BODY",
        ),
        case(
            "missing clientReference",
            r#"{"flow":"standalone"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "an invalid clientReference on the access flow",
            r#"{"flow":"access","clientReference":"c 1"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "email on the standalone flow",
            r#"{"flow":"standalone","clientReference":"c-1","email":"a@b.c"}"#,
            422,
            "INVALID_FIELD",
        ),
        // Field rules.
        case(
            "empty clientReference",
            r#"{"flow":"standalone","clientReference":""}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "non-ASCII clientReference",
            r#"{"flow":"standalone","clientReference":"kunde-ä"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "clientReference with a space",
            r#"{"flow":"standalone","clientReference":"c 1"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "CR/LF in clientReference",
            r#"{"flow":"standalone","clientReference":"c-1\r\nX-Evil: 1"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "NUL in clientReference",
            r#"{"flow":"standalone","clientReference":"c-1\u0000"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "CR/LF in email",
            r#"{"flow":"access","email":"a@b.c\r\nBcc: x@y.z"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "tab in email",
            r#"{"flow":"access","email":"a\t@b.c"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "email without @",
            r#"{"flow":"access","email":"jane.example.com"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "email with two @",
            r#"{"flow":"access","email":"a@b@c"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "CR/LF in phone",
            r#"{"flow":"access","phone":"+49 1\r\n2"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "letters in phone",
            r#"{"flow":"access","phone":"call me"}"#,
            422,
            "INVALID_FIELD",
        ),
        case(
            "control character in phone",
            r#"{"flow":"access","phone":"+49\u0007"}"#,
            422,
            "INVALID_FIELD",
        ),
        owned(
            "overlong clientReference",
            format!(
                r#"{{"flow":"standalone","clientReference":"{}"}}"#,
                "c".repeat(129)
            ),
            422,
            "INVALID_FIELD",
        ),
        owned(
            "overlong email",
            format!(
                r#"{{"flow":"access","email":"{}@example.com"}}"#,
                "a".repeat(320)
            ),
            422,
            "INVALID_FIELD",
        ),
        owned(
            "overlong phone",
            format!(r#"{{"flow":"access","phone":"{}"}}"#, "1".repeat(51)),
            422,
            "INVALID_FIELD",
        ),
        // Size and content type.
        owned(
            "huge body",
            format!(r#"{{"flow":"access","email":"{}"}}"#, "a".repeat(20_000)),
            413,
            "BODY_TOO_LARGE",
        ),
        Case {
            content_type: Some("text/plain"),
            ..case(
                "text/plain body",
                r#"{"flow":"access"}"#,
                415,
                "UNSUPPORTED_MEDIA_TYPE",
            )
        },
        Case {
            content_type: Some("application/x-www-form-urlencoded"),
            ..case("form body", "flow=access", 415, "UNSUPPORTED_MEDIA_TYPE")
        },
        Case {
            content_type: None,
            ..case(
                "no content type",
                r#"{"flow":"access"}"#,
                415,
                "UNSUPPORTED_MEDIA_TYPE",
            )
        },
        // Callers.
        Case {
            api_key: Key::None,
            ..case(
                "missing API key",
                r#"{"flow":"access"}"#,
                401,
                "MISSING_API_KEY",
            )
        },
        Case {
            api_key: Key::Raw(""),
            ..case(
                "empty API key",
                r#"{"flow":"access"}"#,
                401,
                "MISSING_API_KEY",
            )
        },
        Case {
            api_key: Key::Raw("wrong-key"),
            ..case(
                "wrong API key",
                r#"{"flow":"access"}"#,
                401,
                "INVALID_API_KEY",
            )
        },
        Case {
            api_key: Key::Raw("test-api-key-012345678"),
            ..case(
                "API key missing its last character",
                r#"{"flow":"access"}"#,
                401,
                "INVALID_API_KEY",
            )
        },
        Case {
            api_key: Key::AccessOnly,
            ..case(
                "flow the caller may not use",
                r#"{"flow":"standalone","clientReference":"c-1"}"#,
                403,
                "FLOW_NOT_ALLOWED",
            )
        },
        Case {
            api_key: Key::None,
            method: "DELETE",
            path: "/kyc-sessions/current",
            content_type: None,
            ..case("delete without API key", "", 401, "MISSING_API_KEY")
        },
        // Methods and paths.
        Case {
            method: "GET",
            ..case("GET on /kyc-sessions", "", 405, "METHOD_NOT_ALLOWED")
        },
        Case {
            method: "PUT",
            ..case(
                "PUT on /kyc-sessions",
                r#"{"flow":"access"}"#,
                405,
                "METHOD_NOT_ALLOWED",
            )
        },
        Case {
            method: "POST",
            path: "/kyc-sessions/current",
            ..case(
                "POST on /kyc-sessions/current",
                r#"{}"#,
                405,
                "METHOD_NOT_ALLOWED",
            )
        },
        Case {
            path: "/kyc-session",
            ..case("unknown path", r#"{"flow":"access"}"#, 404, "NOT_FOUND")
        },
        Case {
            method: "GET",
            path: "/api/v2/users",
            ..case("finAPI path on the broker", "", 404, "NOT_FOUND")
        },
        // finapiClient picks the client in the query of DELETE /kyc-sessions/current and the
        // identity endpoints, but in the body here: a query was ignored, and the session ran
        // at the caller's default client instead of the one the query named.
        Case {
            path: "/kyc-sessions?finapiClient=default",
            ..case(
                "finapiClient in the query of POST",
                r#"{"flow":"standalone","clientReference":"q-1"}"#,
                422,
                "INVALID_FIELD",
            )
        },
        Case {
            path: "/kyc-sessions?n=7&finapiClient=",
            ..case(
                "finapiClient among other query parameters of POST",
                r#"{"flow":"standalone","clientReference":"q-2"}"#,
                422,
                "INVALID_FIELD",
            )
        },
    ];
    // Keys are compared exactly: no case folding.
    cases.push(Case {
        api_key: Key::Raw("TEST-API-KEY-0123456789"),
        ..case(
            "API key in other case",
            r#"{"flow":"access"}"#,
            401,
            "INVALID_API_KEY",
        )
    });
    cases
}

#[tokio::test]
async fn every_bad_request_gets_its_documented_problem() {
    let env = TestEnv::with(SimConfig::default(), |settings| {
        settings.auth.callers.push(CallerSettings::from_key(
            "access-only",
            ACCESS_ONLY_KEY.as_bytes(),
            &[FlowKind::Access],
        ));
    })
    .await;
    let plain = reqwest::Client::new();
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let mut request = plain.request(
            case.method.parse().unwrap(),
            format!("{}{}", env.broker_url, case.path),
        );
        request = match case.api_key {
            Key::Valid => request.header("x-api-key", TEST_API_KEY),
            Key::AccessOnly => request.header("x-api-key", ACCESS_ONLY_KEY),
            Key::None => request,
            Key::Raw(key) => request.header("x-api-key", key),
        };
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        request = match &case.body {
            Body::Text(text) => request.body(*text),
            Body::Owned(text) => request.body(text.clone()),
        };
        let response = request.send().await.expect("broker answers");
        let outcome = tokio::spawn(expect_problem(response, case.status, case.code)).await;
        if outcome.is_err() {
            failures.push(case.name);
        }
    }
    assert!(failures.is_empty(), "cases failed: {failures:?}");
    // None of it reached finAPI.
    assert!(env.sim.stats().is_empty(), "{:?}", env.sim.stats());
    env.stop().await;
}

/// A body that is not a JSON object was answered with serde's message, which names the
/// broker's Rust type (`invalid type: integer `5`, expected struct CreateSessionBody`). A field
/// of the wrong type is explained by its name and the JSON expected; a body that is not an
/// object says so. `POST /kyc-sessions` is the one endpoint that takes a JSON body.
#[tokio::test]
async fn wrong_types_are_explained_by_field_without_the_brokers_type_names() {
    let env = TestEnv::start().await;
    let cases = [
        (r#"{"flow":5}"#, Some("flow")),
        (r#"{"flow":{}}"#, Some("flow")),
        (r#"{"clientReference":[]}"#, Some("clientReference")),
        (r#"{"flow":"access","email":{}}"#, Some("email")),
        (r#"{"flow":"access","phone":true}"#, Some("phone")),
        (
            r#"{"flow":"access","finapiClient":1}"#,
            Some("finapiClient"),
        ),
        (r#"{"flow":"video"}"#, Some("flow")),
        (r#"{"flow":"access","password":"x"}"#, Some("password")),
        ("5", None),
        ("null", None),
        ("true", None),
        (r#""access""#, None),
        ("[]", None),
        (r#"[{"flow":"access"}]"#, None),
        (r#"["access"]"#, None),
    ];
    for (body, field) in cases {
        let response = env
            .http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("broker answers");
        let problem = expect_problem(response, 400, "INVALID_BODY").await;
        let detail = problem["detail"].as_str().expect("a detail");
        match field {
            Some(field) => assert!(detail.contains(field), "{body}: {detail}"),
            None => assert_eq!(detail, "the body must be a JSON object", "{body}"),
        }
        for rust in [
            "CreateSessionBody",
            "FlowKind",
            "struct",
            "enum ",
            "Option",
            "String",
        ] {
            assert!(!detail.contains(rust), "{body}: {detail}");
        }
    }
    env.stop().await;
}
