//! The OpenAPI document describes exactly what the broker accepts: bodies generated from the
//! served `/openapi.json` go to a real broker (in front of the real simulator), and every body
//! the document's request schema allows is answered `201`, every body it forbids `400` or `422`.

mod common;

use std::collections::BTreeSet;

use common::*;
use giroident_broker::sim::SimConfig;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};

/// Generated bodies per broker configuration (each is one HTTP request).
const CASES: usize = 300;

/// Characters at the edges of the documented rules: allowed in some fields, forbidden in
/// others, white space and control characters of every kind, non-ASCII and non-BMP letters, a
/// zero-width space (not white space), JSON's escapes.
const CHARS: &[char] = &[
    'a', 'Z', '0', '9', '-', '_', '.', ':', '@', '+', ' ', '(', ')', '/', '\t', '\n', '\r', '\0',
    '\u{7f}', '\u{85}', '\u{a0}', '\u{feff}', '\u{200b}', '\u{2028}', '\u{3000}', 'ü', '😀', '"',
    '\\', '%', '<', '#',
];

/// The request body schema of `POST /kyc-sessions` in the served document, and what the
/// generator needs from it.
struct RequestSchema {
    validator: jsonschema::Validator,
    /// The `oneOf` branches, resolved.
    branches: Vec<Value>,
    /// Every property name of every branch.
    properties: BTreeSet<String>,
    /// Every `enum` value of every property.
    enums: Vec<Value>,
    /// Every `minLength`/`maxLength` of every property.
    lengths: BTreeSet<usize>,
}

impl RequestSchema {
    async fn served_by(env: &TestEnv) -> Self {
        let doc: Value = env
            .http
            .get(format!("{}/openapi.json", env.broker_url))
            .send()
            .await
            .expect("document")
            .json()
            .await
            .expect("JSON");
        let body = &doc["paths"]["/kyc-sessions"]["post"]["requestBody"];
        assert_eq!(body["required"], true);
        let reference = body["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .expect("a $ref to the body schema");
        let mut root = doc.clone();
        root["$ref"] = json!(reference);
        let validator = jsonschema::validator_for(&root).expect("a valid JSON Schema");

        let resolve = |r: &str| doc.pointer(r.trim_start_matches('#')).expect("resolves");
        // Each `oneOf` branch (a schema without `oneOf` is its own single branch).
        let top = resolve(reference);
        let branches: Vec<Value> = top["oneOf"]
            .as_array()
            .map_or_else(|| vec![top.clone()], Clone::clone)
            .into_iter()
            .map(|b| match b["$ref"].as_str() {
                Some(r) => resolve(r).clone(),
                None => b,
            })
            .collect();
        let (mut properties, mut enums, mut lengths) = (BTreeSet::new(), vec![], BTreeSet::new());
        for branch in &branches {
            for (name, schema) in branch["properties"].as_object().expect("properties") {
                properties.insert(name.clone());
                collect_enums(&doc, schema, &mut enums);
                for key in ["minLength", "maxLength"] {
                    lengths.extend(schema[key].as_u64().map(|n| n as usize));
                }
            }
        }
        Self {
            validator,
            branches,
            properties,
            enums,
            lengths,
        }
    }

    /// Strings near the documented limits and rules.
    fn strings(&self) -> impl Strategy<Value = String> + use<> {
        // Lengths at and next to every documented limit.
        let mut runs: Vec<usize> = vec![0, 1, 2, 3];
        for &n in &self.lengths {
            runs.extend([n.saturating_sub(2), n.saturating_sub(1), n, n + 1]);
        }
        let run = (
            prop::sample::select(CHARS),
            prop::sample::select(runs.clone()),
        )
            .prop_map(|(c, n)| c.to_string().repeat(n));
        let pieces = prop::collection::vec(run, 1..4).prop_map(|p| p.concat());
        // `x@y` shapes whose total length lands on a limit, with one- and four-byte letters.
        let shaped = (
            prop::sample::select(vec!['a', 'ü', '😀', '0']),
            prop::sample::select(runs),
            prop::sample::select(vec!["@b", "@", "@b@c", "@😀", "", "@ b"]),
        )
            .prop_map(|(c, n, tail)| {
                let head: String =
                    std::iter::repeat_n(c, n.saturating_sub(tail.chars().count())).collect();
                format!("{head}{tail}")
            });
        prop_oneof![
            4 => pieces,
            3 => shaped,
            2 => "[A-Za-z0-9._:@+-]{1,12}",
            2 => "[a-z0-9]{1,8}@[a-z0-9.]{1,8}",
            2 => "[0-9 +()/-]{0,12}",
            1 => "\\PC{0,10}",
        ]
    }

    /// A property value: a documented `enum` value, a string near the rules, or a wrong type.
    fn values(&self) -> impl Strategy<Value = Value> + use<> {
        let mut wrong = vec![
            json!(null),
            json!(0),
            json!(1.5),
            json!(true),
            json!([]),
            json!({}),
            json!("Standalone"),
            json!(""),
            json!("standalone"),
            json!("access"),
        ];
        wrong.extend(self.enums.iter().map(|e| json!([e])));
        let mut enums = self.enums.clone();
        enums.push(Value::Null);
        prop_oneof![
            3 => prop::sample::select(enums),
            6 => self.strings().prop_map(Value::from),
            1 => prop::sample::select(wrong),
        ]
    }

    /// A value for one property of a branch: mostly what its schema describes (its `enum`,
    /// strings generated from its `pattern`), sometimes an edge string, null or a wrong type.
    fn value_for(&self, schema: &Value) -> BoxedStrategy<Value> {
        let mut options: Vec<(u32, BoxedStrategy<Value>)> = vec![(2, self.values().boxed())];
        if let Some(values) = schema["enum"].as_array() {
            options.push((6, prop::sample::select(values.clone()).boxed()));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            // proptest generates from a regex without anchors.
            let body = pattern.trim_start_matches('^').trim_end_matches('$');
            let generated = proptest::string::string_regex(body).expect("a pattern proptest reads");
            options.push((6, generated.prop_map(Value::from).boxed()));
        }
        if schema["type"] == "null" {
            options.push((2, Just(Value::Null).boxed()));
        }
        prop::strategy::Union::new_weighted(options).boxed()
    }

    /// Bodies aimed at one branch: each of its properties absent or with a value for it.
    fn branch_bodies(&self) -> impl Strategy<Value = Value> + use<> {
        let per_branch: Vec<BoxedStrategy<Value>> = self
            .branches
            .iter()
            .map(|branch| {
                let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = branch["properties"]
                    .as_object()
                    .expect("properties")
                    .iter()
                    .map(|(name, schema)| {
                        let name = name.clone();
                        let value = self.value_for(schema);
                        prop::option::weighted(0.6, value)
                            .prop_map(move |v| v.map(|v| (name.clone(), v)))
                            .boxed()
                    })
                    .collect();
                fields
                    .prop_map(|fields| Value::Object(fields.into_iter().flatten().collect()))
                    .boxed()
            })
            .collect();
        prop::strategy::Union::new(per_branch)
    }

    /// Any object of documented (and now and then unknown) properties, and bodies aimed at one
    /// branch of the document.
    fn bodies(&self) -> impl Strategy<Value = Value> + use<> {
        let mut names: Vec<String> = self.properties.iter().cloned().collect();
        names.extend([
            "Flow".to_owned(),
            "client_reference".to_owned(),
            "x".to_owned(),
        ]);
        let known = self.properties.len();
        let values = self.values();
        // Documented names most of the time: unknown ones make a body invalid at once.
        let name = prop_oneof![
            12 => prop::sample::select(names[..known].to_vec()),
            1 => prop::sample::select(names[known..].to_vec()),
        ];
        let free = prop::collection::btree_map(name, values, 0..4)
            .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<String, Value>>()));
        prop_oneof![1 => free, 2 => self.branch_bodies()]
    }
}

/// Every `enum` value inside `schema`, following `$ref`s into `doc`.
fn collect_enums(doc: &Value, schema: &Value, into: &mut Vec<Value>) {
    match schema {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                let target = doc.pointer(r.trim_start_matches('#')).expect("resolves");
                collect_enums(doc, target, into);
            }
            into.extend(
                map.get("enum")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            map.values().for_each(|v| collect_enums(doc, v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_enums(doc, v, into)),
        _ => {}
    }
}

/// Bodies whose answer is known by heart: the fuzzer's report from the issue, missing and null
/// flows, limits, and bodies that are not objects.
fn fixed_cases() -> Vec<Value> {
    let a = |n: usize| "a".repeat(n);
    vec![
        json!({"flow": "standalone", "clientReference": "customer-4711", "email": "0@0"}),
        json!({"flow": "standalone", "clientReference": "customer-4711"}),
        json!({"flow": "standalone", "clientReference": "c", "email": null, "phone": null}),
        json!({"flow": "access", "clientReference": "c"}),
        json!({"flow": "access", "clientReference": null, "email": "0@0", "phone": "1"}),
        json!({"flow": "access", "email": format!("{}@b", a(318))}),
        json!({"flow": "access", "email": format!("{}@b", a(319))}),
        json!({"flow": "access", "email": format!("{}@b", "ü".repeat(318))}),
        json!({"flow": "access", "email": "a\u{feff}@b"}),
        json!({"flow": "access", "email": "a\u{85}@b"}),
        json!({"flow": "access", "phone": "1".repeat(50)}),
        json!({"flow": "access", "phone": "1".repeat(51)}),
        json!({"flow": "access", "phone": "123\n"}),
        json!({"clientReference": a(128)}),
        json!({"clientReference": a(129)}),
        json!({"clientReference": ""}),
        json!({"flow": null, "clientReference": "c"}),
        json!({"flow": null}),
        json!({}),
        json!({"email": "a@b"}),
        json!([]),
        json!(["standalone", "c"]),
        json!("standalone"),
        json!(null),
    ]
}

/// Sends every body and checks the answer against the schema, both ways.
async fn check_both_directions(default_flow: &str) {
    let env = TestEnv::with(SimConfig::default(), |settings| {
        settings.flows.default_flow = default_flow.to_owned();
    })
    .await;
    let schema = RequestSchema::served_by(&env).await;
    let mut bodies = fixed_cases();
    // Deterministic, so that a failure repeats; the failing body is in the message.
    let mut runner = TestRunner::deterministic();
    let strategy = schema.bodies();
    for _ in 0..CASES {
        bodies.push(strategy.new_tree(&mut runner).expect("a body").current());
    }

    let (mut allowed, mut forbidden) = (0, 0);
    for body in &bodies {
        let valid = schema.validator.is_valid(body);
        let response = env
            .http
            .post(format!("{}/kyc-sessions", env.broker_url))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("JSON"))
            .send()
            .await
            .expect("broker answers");
        let status = response.status().as_u16();
        let answer = response.text().await.unwrap_or_default();
        if valid {
            allowed += 1;
            assert_eq!(
                status, 201,
                "default flow {default_flow}: the document allows {body}, the broker answered {answer}"
            );
        } else {
            forbidden += 1;
            assert!(
                matches!(status, 400 | 422),
                "default flow {default_flow}: the document forbids {body}, the broker answered {status} {answer}"
            );
        }
    }
    // The generator stays useful only while it produces plenty of both.
    assert!(
        allowed >= CASES / 10 && forbidden >= CASES / 10,
        "{allowed} allowed, {forbidden} forbidden"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_document_allows_exactly_what_the_broker_accepts() {
    check_both_directions("standalone").await;
}

#[tokio::test]
async fn with_access_as_default_a_body_without_flow_is_an_access_body() {
    check_both_directions("access").await;
}

#[tokio::test]
async fn the_fuzzers_report_is_forbidden_by_the_document() {
    let env = TestEnv::start().await;
    let schema = RequestSchema::served_by(&env).await;
    let reported =
        json!({"flow": "standalone", "clientReference": "customer-4711", "email": "0@0"});
    assert!(!schema.validator.is_valid(&reported));
    let response = env.start_session(reported).await;
    assert_eq!(response.status(), 422);
    env.stop().await;
}

/// JSON Schema sees a parsed value, where a repeated member is already gone; the README
/// documents that the broker refuses it.
#[tokio::test]
async fn a_repeated_member_is_refused() {
    let env = TestEnv::start().await;
    let response = env
        .http
        .post(format!("{}/kyc-sessions", env.broker_url))
        .header("content-type", "application/json")
        .body(r#"{"flow":"standalone","clientReference":"c-1","clientReference":"c-2"}"#)
        .send()
        .await
        .expect("broker answers");
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.expect("problem");
    assert_eq!(problem["code"], "INVALID_BODY");
    env.stop().await;
}
