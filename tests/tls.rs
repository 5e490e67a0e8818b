//! HTTPS to finAPI, verified: the real broker calls the real simulator over TLS on loopback,
//! trusting the simulator's authority through `finapi.ca_file` on top of the system's roots.
//! A certificate it must not trust answers `502 UPSTREAM_CERTIFICATE_REJECTED` at once, names
//! the problem in the log, and is never retried.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use common::{CapturedLogs, TestCa, TestEnv, expect_problem};
use giroident_broker::config::LogFormat;
use giroident_broker::demo::{Ledger, settings_for_simulator};
use giroident_broker::sim::{self, SimConfig};
use secrecy::SecretString;
use serde_json::json;

/// Every log line of this test binary (the subscriber is global).
fn logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| CapturedLogs::install(LogFormat::Json, "info"))
}

/// Longer than any session may take with the default settings: reaching it means a hang.
const NO_HANG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn both_flows_and_the_deletion_work_over_verified_https() {
    let ca = TestCa::new();
    let env = TestEnv::with_tls(SimConfig::default(), ca.local_tls(), &ca, |_| {}).await;
    assert!(env.sim.base_url().starts_with("https://127.0.0.1:"));

    let standalone = env.standalone_session("customer-tls-1").await;
    assert!(standalone["accessToken"].is_string(), "{standalone}");

    let access = common::expect_created(
        env.start_session(json!({"flow": "access", "clientReference": "customer-tls-2"}))
            .await,
    )
    .await;
    let token = access["accessToken"].as_str().expect("a user token");
    // The token works at the simulator, reached over HTTPS by the test's own client.
    assert_eq!(env.sim_user(token).await.status(), 200);

    let deleted = env
        .http
        .delete(format!("{}/identities/customer-tls-2", env.broker_url))
        .send()
        .await
        .expect("broker answers");
    assert_eq!(deleted.status(), 204);
    assert_eq!(env.calls("DELETE /api/v2/users", "200"), 1);
    assert!(env.sim.tls_connections() >= 1);
    env.stop().await;
}

/// The three ways a certificate can be wrong that matter in practice.
#[tokio::test]
async fn a_certificate_the_broker_must_not_trust_answers_502_names_its_problem_and_is_not_retried()
{
    let logs = logs();
    let trusted = TestCa::new();
    let stranger = TestCa::new();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let cases = [
        ("UnknownIssuer", stranger.local_tls()),
        (
            "NotValidForName",
            trusted
                .ca
                .issue(&["finapi.example"])
                .expect("a certificate"),
        ),
        (
            "Expired",
            trusted
                .ca
                .issue_valid(&sim::LOCAL_NAMES, now - 30 * day, now - day)
                .expect("a certificate"),
        ),
    ];
    for (problem, tls) in cases {
        let env = TestEnv::with_tls(SimConfig::default(), tls, &trusted, |_| {}).await;
        let response = tokio::time::timeout(
            NO_HANG,
            env.start_session(json!({"flow": "standalone", "clientReference": "c-1"})),
        )
        .await
        .unwrap_or_else(|_| panic!("{problem}: the broker hung"));
        let body = expect_problem(response, 502, "UPSTREAM_CERTIFICATE_REJECTED").await;
        assert!(
            !body.to_string().contains(problem),
            "the caller is told no detail: {body}"
        );
        // One connection, one refused handshake: no retry, whatever the retry budget.
        assert_eq!(env.sim.tls_connections(), 1, "{problem}: retried");
        assert_eq!(env.resilience().retries, 0, "{problem}");
        assert!(env.sim.stats().is_empty(), "{problem}: a call got through");
        let metrics = env.metrics_text().await;
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with("broker_finapi_calls_total")
                    && line.contains("outcome=\"certificate_rejected\"")),
            "{problem}: {metrics}"
        );
        let text = logs.text();
        assert!(
            text.lines()
                .any(|line| line.contains("UPSTREAM_CERTIFICATE_REJECTED")
                    && line.contains(&format!("refused finAPI's TLS certificate ({problem})"))),
            "{problem}: no log line names it: {text}"
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_a_config_error_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("gib-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).unwrap();
    let no_cert = dir.join("key-only.pem");
    std::fs::write(&no_cert, "not a certificate\n").unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let missing = dir.join("missing.pem");

    let key = SecretString::from("k");
    let ledger = Ledger {
        database_url: SecretString::from("sqlite:///nonexistent/test.db"),
        password_key: SecretString::from(common::TEST_PASSWORD_KEY),
    };
    let any_port = "127.0.0.1:0".parse().unwrap();
    for (path, says) in [
        (&missing, "cannot read"),
        (&no_cert, "holds no PEM CERTIFICATE"),
        (&garbage, "not a usable CA certificate"),
        (&broken, "not a PEM bundle"),
    ] {
        let err = settings_for_simulator(
            any_port,
            any_port,
            "https://127.0.0.1:9",
            Some(path),
            &key,
            &ledger,
        )
        .err()
        .unwrap_or_else(|| panic!("{} was accepted", path.display()));
        assert!(err.mentions("finapi.ca_file"), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `giroident-broker sim` with TLS flags, on port 0; returns the child and its address from
/// its "finAPI simulator listening" log line, or its exit code and what it wrote to stderr
/// once it has exited.
fn spawn_sim(args: &[&str]) -> Result<(std::process::Child, String), (Option<i32>, String)> {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_giroident-broker"))
        .args(["sim", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut written = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        written.push_str(&line);
        written.push('\n');
        if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
            && log["message"] == "finAPI simulator listening"
        {
            assert_eq!(log["scheme"], "https", "{line}");
            let addr = log["addr"].as_str().expect("addr").to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, addr));
        }
    }
    let status = child.wait().expect("the simulator exits");
    Err((status.code(), written))
}

/// `giroident-broker healthcheck` against `url`, trusting `ca_file` if given: its exit code.
fn healthcheck(url: &str, ca_file: Option<&std::path::Path>) -> i32 {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_giroident-broker"));
    command.args(["healthcheck", "--url", url]).env_clear();
    if let Some(file) = ca_file {
        command.arg("--ca-file").arg(file);
    }
    command
        .output()
        .expect("the binary runs")
        .status
        .code()
        .expect("an exit code")
}

#[test]
fn the_sim_command_serves_https_from_pem_files_or_its_own_authority() {
    let dir = std::env::temp_dir().join(format!("gib-simtls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).unwrap();

    // Its own authority: the written certificate is all a client needs to trust it.
    let ca_file = dir.join("ca.pem");
    let (mut child, addr) =
        spawn_sim(&["--tls-self-signed-ca", ca_file.to_str().unwrap()]).expect("sim starts");
    let url = format!("https://{addr}/__sim/stats");
    assert_eq!(healthcheck(&url, Some(&ca_file)), 0);
    assert_eq!(healthcheck(&url, None), 1, "trusted without the authority");
    let _ = child.kill();
    let _ = child.wait();

    // PEM files made elsewhere (here with rcgen, as openssl does for compose).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "files test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_file, key_file, files_ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("files-ca.pem"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&files_ca, ca_cert.pem()).unwrap();
    let (cert_arg, key_arg) = (cert_file.to_str().unwrap(), key_file.to_str().unwrap());
    let (mut child, addr) =
        spawn_sim(&["--tls-cert", cert_arg, "--tls-key", key_arg]).expect("sim starts");
    assert_eq!(
        healthcheck(&format!("https://{addr}/__sim/stats"), Some(&files_ca)),
        0
    );
    let _ = child.kill();
    let _ = child.wait();

    // A key file that holds no key: exit 2 with the flag named, no port bound.
    let (code, stderr) = spawn_sim(&["--tls-cert", cert_arg, "--tls-key", cert_arg])
        .expect_err("the simulator refuses to start");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each named client trusts its own `ca_file`: `default` (the top-level `finapi.ca_file`) one
/// authority, `live` another, at two HTTPS simulators; neither trusts the other's.
#[tokio::test]
async fn each_finapi_client_trusts_its_own_ca_file() {
    let default_ca = TestCa::new();
    let live_ca = TestCa::new();
    let live_sim = sim::start(SimConfig {
        tls: Some(live_ca.local_tls()),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let live_url = live_sim.base_url();
    let env = TestEnv::with_tls(
        SimConfig::default(),
        default_ca.local_tls(),
        &default_ca,
        |settings| {
            common::add_finapi_client(
                settings,
                "live",
                &live_sim,
                sim::DEMO_CLIENT_ID,
                sim::DEMO_CLIENT_SECRET,
            );
            settings.finapi.clients.get_mut("live").unwrap().ca_file = Some(live_ca.file.clone());
            // `other` reaches the live simulator without trusting its authority.
            common::add_finapi_client(
                settings,
                "other",
                &live_sim,
                sim::DEMO_CLIENT_ID,
                sim::DEMO_CLIENT_SECRET,
            );
            settings.auth.callers[0].finapi_clients =
                Some(vec!["default".into(), "live".into(), "other".into()]);
        },
    )
    .await;
    assert!(live_url.starts_with("https://"));
    for client in ["default", "live"] {
        let created = common::expect_created(
            env.start_session(json!({"flow": "access", "finapiClient": client}))
                .await,
        )
        .await;
        assert_eq!(created["finapiClient"], client, "{created}");
    }
    assert!(live_sim.tls_connections() >= 1);
    expect_problem(
        env.start_session(json!({"flow": "access", "finapiClient": "other"}))
            .await,
        502,
        "UPSTREAM_CERTIFICATE_REJECTED",
    )
    .await;
    env.stop().await;
}

/// A simulator at HTTPS offering `h2` and `http/1.1`, or `http/1.1` alone.
fn offered(ca: &TestCa, h2: bool) -> sim::SimTls {
    let tls = ca.local_tls();
    if h2 { tls } else { tls.http1_only() }
}

/// ALPN (RFC 7301): with `finapi.http2` the broker offers `h2` and `http/1.1` and takes what
/// finAPI chooses; by default it offers `http/1.1` alone.
#[tokio::test]
async fn both_flows_work_with_http2_offered_or_not_on_either_side() {
    // (finAPI offers h2, finapi.http2, HTTP/2 expected)
    for (offers_h2, http2, expect_h2) in [
        (true, true, true),
        (false, true, false),
        (true, false, false),
    ] {
        let case = format!("finAPI offers h2: {offers_h2}, finapi.http2: {http2}");
        let ca = TestCa::new();
        let env = TestEnv::with_tls(SimConfig::default(), offered(&ca, offers_h2), &ca, |s| {
            s.finapi.http2 = http2;
        })
        .await;
        let standalone = env.standalone_session("customer-alpn-1").await;
        assert!(
            standalone["accessToken"].is_string(),
            "{case}: {standalone}"
        );
        let access = common::expect_created(
            env.start_session(json!({"flow": "access", "clientReference": "customer-alpn-2"}))
                .await,
        )
        .await;
        assert!(access["accessToken"].is_string(), "{case}: {access}");
        let connections = env.sim.connection_stats().expect("served over HTTPS");
        assert!(connections.tls_handshakes >= 1, "{case}: {connections:?}");
        let h2 = if expect_h2 {
            connections.tls_handshakes
        } else {
            0
        };
        assert_eq!(connections.h2, h2, "{case}: {connections:?}");
        let stats: serde_json::Value = env
            .http
            .get(format!("{}/__sim/stats", env.sim.base_url()))
            .send()
            .await
            .expect("the simulator answers")
            .json()
            .await
            .expect("stats JSON");
        // This call's own connection may be counted too: it happened after the snapshot.
        assert!(
            stats["connections"]["h2"].as_u64() >= Some(h2),
            "{case}: {stats}"
        );
        assert!(
            stats["connections"]["tlsHandshakes"].as_u64() >= Some(1),
            "{stats}"
        );
        env.stop().await;
    }
}

/// With HTTP/2 the sessions in flight share the connection the first one opened; with
/// HTTP/1.1 each call in flight needs a connection of its own.
#[tokio::test]
async fn http2_carries_concurrent_sessions_over_one_connection() {
    const SESSIONS: usize = 16;
    let mut new_connections = Vec::new();
    for http2 in [true, false] {
        let ca = TestCa::new();
        let env = TestEnv::with_tls(SimConfig::default(), offered(&ca, true), &ca, |s| {
            s.finapi.http2 = http2;
        })
        .await;
        // The first session opens a connection and caches the client token.
        common::expect_created(env.start_session(json!({"flow": "access"})).await).await;
        env.sim.reset_stats();
        // Long enough that all sessions' calls overlap.
        env.sim.add_fault(sim::FaultRule {
            endpoint: sim::ANY_ENDPOINT.into(),
            latency_ms: Some(200),
            ..sim::FaultRule::default()
        });
        let sessions = (0..SESSIONS).map(|_| env.start_session(json!({"flow": "access"})));
        for response in futures_util::future::join_all(sessions).await {
            common::expect_created(response).await;
        }
        assert_eq!(env.calls("POST /api/v2/users", "201"), SESSIONS as u64);
        new_connections.push(env.sim.connection_stats().expect("HTTPS").accepted);
        env.stop().await;
    }
    let [h2, http1] = new_connections[..] else {
        unreachable!()
    };
    assert!(
        h2 <= 1,
        "HTTP/2 opened {h2} connections for {SESSIONS} sessions"
    );
    assert!(
        http1 >= (SESSIONS / 2) as u64,
        "HTTP/1.1 opened only {http1} connections for {SESSIONS} concurrent sessions"
    );
}
