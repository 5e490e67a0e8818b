//! A JSON body extractor whose refusals answer in the problem shape. It checks the content
//! type, reads the body within `limits.read_timeout_secs` and `limits.max_body_bytes`, then
//! parses it.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// A JSON request body, with every refusal turned into an [`ApiError`].
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > state.max_body_bytes as u64) {
            return Err(ApiError::BodyTooLarge);
        }
        let read = axum::body::to_bytes(req.into_body(), state.max_body_bytes);
        let bytes = match tokio::time::timeout(state.read_timeout, read).await {
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(Err(err)) if is_length_limit(&err) => return Err(ApiError::BodyTooLarge),
            Ok(Err(_)) => return Err(ApiError::MalformedJson("the body could not be read".into())),
            Ok(Ok(bytes)) => bytes,
        };
        let object = bytes.trim_ascii_start().first() == Some(&b'{');
        // serde_json alone first: axum's parser tracks the path of every field for its error
        // message, which a valid body never needs; an invalid one is parsed again below for it.
        if object && let Ok(value) = serde_json::from_slice::<T>(&bytes) {
            return Ok(Self(value));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            // serde also fills a struct from a JSON array, by position: only objects are bodies.
            Ok(_) if !object => Err(not_an_object()),
            Ok(axum::Json(value)) => Ok(Self(value)),
            // serde's message for a value that is not an object names the Rust type it expected
            // ("expected struct CreateSessionBody"), which is no business of the caller's.
            Err(JsonRejection::JsonDataError(_)) if !object => Err(not_an_object()),
            // For a field, serde names the field and the JSON it expected ("flow: invalid type:
            // integer `5`, expected a string").
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::InvalidBody(serde_detail(&e.body_text())))
            }
            Err(rejection) => Err(ApiError::MalformedJson(serde_detail(
                &rejection.body_text(),
            ))),
        }
    }
}

/// `application/json` or `application/<anything>+json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // Compared without case (RFC 9110, section 8.3.1) and without a lowercased copy.
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    let ends_with_json = sub
        .len()
        .checked_sub(5)
        .and_then(|at| sub.get(at..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"));
    kind.eq_ignore_ascii_case("application") && (sub.eq_ignore_ascii_case("json") || ends_with_json)
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// axum prefixes serde's message with a generic sentence; keep serde's part.
fn serde_detail(text: &str) -> String {
    text.split_once(": ")
        .map_or(text, |(_, rest)| rest)
        .to_owned()
}

fn not_an_object() -> ApiError {
    ApiError::InvalidBody("the body must be a JSON object".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        for (value, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/problem+json", true),
            ("APPLICATION/vnd.api+JSON ; q=1", true),
            ("application/json5", false),
            ("application/jsonx+xml", false),
            ("json", false),
            ("text/json", false),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_json(&h), ok, "{value}");
        }
    }
}
