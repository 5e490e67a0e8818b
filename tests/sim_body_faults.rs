//! The simulator's body faults (`set`, `padBytes`, `stallAfterBytes`/`stallMs`,
//! `cutAfterBytes`): answers finAPI's contract forbids, produced over a real socket so that the
//! broker's readers can be tested against them.

use std::time::{Duration, Instant};

use giroident_broker::sim::{self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FaultRule, SimHandle};
use serde_json::{Value, json};

async fn sim_with(rule: FaultRule) -> (SimHandle, reqwest::Client) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let handle = sim::start(sim::SimConfig::default())
        .await
        .expect("simulator starts");
    handle.add_fault(rule);
    (handle, reqwest::Client::new())
}

fn client_token_rule() -> FaultRule {
    FaultRule {
        endpoint: "POST /api/v2/oauth/token client_credentials".to_owned(),
        ..FaultRule::default()
    }
}

async fn client_token(sim: &SimHandle, http: &reqwest::Client) -> reqwest::Response {
    http.post(format!("{}/api/v2/oauth/token", sim.base_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_CLIENT_ID),
            ("client_secret", DEMO_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap_or_else(|err| panic!("answer: {err:?}"))
}

#[tokio::test]
async fn set_overrides_fields_of_the_real_answer() {
    let set = json!({"expires_in": 9_223_372_036_854_775_807_u64, "access_token": "a\nb"});
    let (sim, http) = sim_with(FaultRule {
        set: set.as_object().cloned(),
        ..client_token_rule()
    })
    .await;
    let answer: Value = client_token(&sim, &http).await.json().await.unwrap();
    assert_eq!(answer["expires_in"], 9_223_372_036_854_775_807_u64);
    assert_eq!(answer["access_token"], "a\nb");
    // The rest of the real answer stays.
    assert_eq!(answer["token_type"], "bearer");
    assert_eq!(answer["scope"], "all");
}

#[tokio::test]
async fn set_applies_to_injected_errors_too() {
    let (sim, http) = sim_with(FaultRule {
        status: Some(500),
        set: json!({"authContext": 7}).as_object().cloned(),
        ..client_token_rule()
    })
    .await;
    let response = client_token(&sim, &http).await;
    assert_eq!(response.status(), 500);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["authContext"], 7);
    assert_eq!(answer["errors"][0]["code"], "UNEXPECTED_ERROR");
}

#[tokio::test]
async fn padding_streams_a_huge_but_valid_body() {
    let pad = 20 * 1024 * 1024;
    let (sim, http) = sim_with(FaultRule {
        status: Some(500),
        pad_bytes: Some(pad),
        ..client_token_rule()
    })
    .await;
    let response = client_token(&sim, &http).await;
    let announced = response.content_length().expect("a Content-Length");
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, announced);
    assert!(announced > pad);
    let answer: Value = serde_json::from_slice(&bytes).expect("still JSON");
    assert_eq!(answer["errors"][0]["code"], "UNEXPECTED_ERROR");
}

#[tokio::test]
async fn a_stalled_body_arrives_late_but_whole() {
    let (sim, http) = sim_with(FaultRule {
        stall_after_bytes: Some(10),
        stall_ms: Some(400),
        ..client_token_rule()
    })
    .await;
    let started = Instant::now();
    let response = client_token(&sim, &http).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    // From the request's start: how much of the stall falls before the head arrives depends on
    // scheduling, the whole of it never does.
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(answer["access_token"].is_string());
}

#[tokio::test]
async fn a_cut_body_is_an_incomplete_answer() {
    let (sim, http) = sim_with(FaultRule {
        cut_after_bytes: Some(10),
        count: Some(1),
        ..client_token_rule()
    })
    .await;
    let response = client_token(&sim, &http).await;
    assert_eq!(response.status(), 200);
    let read = response.bytes().await;
    assert!(read.is_err(), "expected a broken body: {read:?}");
    // The call was handled: the next one gets the same token, whole.
    let answer: Value = client_token(&sim, &http).await.json().await.unwrap();
    assert!(answer["access_token"].is_string());
}

#[tokio::test]
async fn body_faults_are_validated() {
    let invalid = [
        FaultRule {
            drop_connection: true,
            pad_bytes: Some(1),
            ..client_token_rule()
        },
        FaultRule {
            stall_after_bytes: Some(1),
            ..client_token_rule()
        },
        FaultRule {
            pad_bytes: Some(u64::MAX),
            ..client_token_rule()
        },
    ];
    for rule in invalid {
        assert!(rule.validate().is_err(), "{rule:?}");
    }
    assert!(
        FaultRule {
            cut_after_bytes: Some(3),
            ..client_token_rule()
        }
        .validate()
        .is_ok()
    );
}
