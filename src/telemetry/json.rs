//! JSON log lines, written directly: one object per event with `timestamp`, `level`, the
//! event's fields (`message` among them), `target`, and `span`: the fields of the request the
//! event belongs to ([`crate::api::request_id::RequestFields`], named `request`), or else those
//! of the event's `tracing` span with its `name`. The shape of tracing-subscriber's JSON format with `flatten_event` and
//! `with_current_span`, at a fraction of its cost: that format keeps each span's fields as a
//! JSON object, re-parses and re-writes it on every `record` and on every event inside the
//! span (docs/BENCHMARKS.md, "Issue 15: logging at info and the request path"). Here a span's
//! fields are kept as the members of an object without its braces (`"a":1,"b":"x"`), so that a
//! `record` appends and an event copies them as they are.
//!
//! Strings are escaped as JSON (RFC 8259, section 7) by serde_json.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats the fields of spans (and events) as JSON object members, `"name":value`, separated
/// by commas; a `record` appends its members to the span's.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Members::new(writer, true);
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut visitor = Members::new(current.as_writer(), first);
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Formats an event as one JSON line (see the module's documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A `log` crate record (a dependency's) arrives with the target `log` and its real
        // target, module and file as `log.*` fields: written with its own target, without them.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut visitor = Members::new(writer.by_ref(), false);
        visitor.skip_log_fields = normalized.is_some();
        event.record(&mut visitor);
        visitor.result?;
        writer.write_str(",\"target\":")?;
        json_string(&mut writer, meta.target())?;
        // A request's lines show its fields as the span they were in before (README
        // "Logging"); they are kept by the task that serves it, not in a `tracing` span.
        let request = crate::api::request_id::with_fields(|fields| {
            writer.write_str(",\"span\":{")?;
            fields.visit(|name, value| {
                json_string(&mut writer, name)?;
                writer.write_str(":\"")?;
                write!(Escaped(&mut writer), "{value}")?;
                writer.write_str("\",")
            })?;
            writer.write_str("\"name\":\"request\"}")
        });
        if let Some(written) = request {
            written?;
        } else if let Some(span) = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
        {
            writer.write_str(",\"span\":{")?;
            let extensions = span.extensions();
            if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>()
                && !fields.fields.is_empty()
            {
                writer.write_str(&fields.fields)?;
                writer.write_char(',')?;
            }
            writer.write_str("\"name\":")?;
            json_string(&mut writer, span.name())?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
    }
}

/// Writes fields as JSON object members; `first` says whether none precede them.
struct Members<'w> {
    writer: Writer<'w>,
    first: bool,
    /// Whether the `log.*` fields of a `log` record are left out.
    skip_log_fields: bool,
    result: fmt::Result,
}

impl<'w> Members<'w> {
    fn new(writer: Writer<'w>, first: bool) -> Self {
        Self {
            writer,
            first,
            skip_log_fields: false,
            result: Ok(()),
        }
    }

    /// Writes `,"name":` (no comma before the first member), then the value with `value`.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'w>) -> fmt::Result) {
        if self.result.is_err() || (self.skip_log_fields && field.name().starts_with("log.")) {
            return;
        }
        if !self.first {
            self.result = self.writer.write_char(',');
        }
        self.first = false;
        if self.result.is_ok() {
            self.result = json_string(&mut self.writer, field.name())
                .and_then(|()| self.writer.write_char(':'))
                .and_then(|()| value(&mut self.writer));
        }
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| json_string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: serde_json writes those as null. Written straight into
        // the line, not through a `String` of its own.
        self.member(field, |w| {
            serde_json::to_writer(FmtWriter(w), &value).map_err(|_| fmt::Error)
        });
    }
}

/// Now as tracing-subscriber's `SystemTime` writes it (RFC 3339, UTC, microseconds:
/// `2026-12-01T02:59:11.570000Z`), with the part up to the second formatted once a second
/// per thread: the date and time fields cost about 2,000 instructions a line.
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    /// The second (since the Unix epoch) and its text up to the `.`.
    struct Second {
        secs: u64,
        prefix: String,
    }
    thread_local! {
        static SECOND: std::cell::RefCell<Option<Second>> = const { std::cell::RefCell::new(None) };
    }
    let since_epoch = |time: std::time::SystemTime| time.duration_since(std::time::UNIX_EPOCH);
    let Ok(now) = since_epoch(std::time::SystemTime::now()) else {
        return SystemTime.format_time(writer);
    };
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if let Some(cached) = second.as_ref().filter(|c| c.secs == now.as_secs()) {
            writer.write_str(&cached.prefix)?;
            return write!(writer, ".{:06}Z", now.subsec_micros());
        }
        // A new second: tracing-subscriber's own text, kept if the clock stayed in the second
        // it was read in (its time lies between the two readings).
        let mut text = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut text))?;
        let after = since_epoch(std::time::SystemTime::now())
            .ok()
            .map(|d| d.as_secs());
        if after == Some(now.as_secs())
            && let Some(dot) = text.find('.')
        {
            *second = Some(Second {
                secs: now.as_secs(),
                prefix: text[..dot].to_owned(),
            });
        }
        writer.write_str(&text)
    })
}

/// A log line's writer as an `io::Write`, for serde_json (which writes UTF-8 only).
struct FmtWriter<'a, 'w>(&'a mut Writer<'w>);

impl std::io::Write for FmtWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
        self.0.write_str(text).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `text` as a JSON string, quotes included.
fn json_string(writer: &mut Writer<'_>, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(writer).write_str(text)?;
    writer.write_char('"')
}

/// Writes what it is given as the contents of a JSON string.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let plain = text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if plain {
            return self.0.write_str(text);
        }
        // Rare (quotes, backslashes, control characters): serde_json knows the escapes.
        let quoted = serde_json::to_string(text).map_err(|_| fmt::Error)?;
        let inner = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .ok_or(fmt::Error)?;
        self.0.write_str(inner)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Runs `f` under a subscriber writing [`JsonLine`]s; returns the lines, parsed.
    pub(crate) fn lines(f: impl FnOnce()) -> Vec<Value> {
        let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(JsonFields)
            .event_format(JsonLine)
            .with_writer(move || Sink(sink.clone()));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        let text = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_event_in_a_span_is_one_object_with_the_span_fields_recorded_later() {
        let got = lines(|| {
            let span = tracing::info_span!(
                "request",
                request_id = "r-1",
                caller = tracing::field::Empty,
                user_id = tracing::field::Empty,
            );
            span.record("caller", "web");
            span.record("user_id", "u-2");
            span.in_scope(|| {
                tracing::info!(
                    status = 201u16,
                    latency_ms = 1.5,
                    ok = true,
                    "request finished"
                )
            });
        });
        assert_eq!(got.len(), 1);
        let line = &got[0];
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request finished");
        assert_eq!(line["status"], 201);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["ok"], true);
        assert!(line["target"].as_str().unwrap().contains("json"));
        assert_eq!(
            line["span"],
            json!({"request_id": "r-1", "caller": "web", "user_id": "u-2", "name": "request"})
        );
    }

    #[test]
    fn timestamps_read_as_tracing_subscribers_own_within_and_across_seconds() {
        let theirs = || {
            let mut text = String::new();
            SystemTime.format_time(&mut Writer::new(&mut text)).unwrap();
            text
        };
        let mut checked = 0;
        while checked < 3 {
            // The first is formatted whole, the others from the second's cached text.
            let before = theirs();
            let mut ours = String::new();
            write_timestamp(&mut Writer::new(&mut ours)).unwrap();
            let after = theirs();
            if before[..19] != after[..19] {
                continue; // the clock moved on to the next second meanwhile
            }
            assert_eq!(ours.len(), before.len(), "{ours} {before}");
            assert_eq!(ours[..20], before[..20], "{ours} {before}");
            assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()), "{ours}");
            assert!(ours.ends_with('Z'), "{ours}");
            assert!(before[20..26] <= ours[20..26] && ours[20..26] <= after[20..26]);
            checked += 1;
        }
    }

    #[test]
    fn strings_are_escaped_and_odd_numbers_stay_valid_json() {
        let nasty = "quote \" backslash \\ newline \n tab \t nul \0 bell \u{7} ümlaut";
        let got = lines(|| {
            let span = tracing::info_span!("s", empty = tracing::field::Empty);
            let _entered = span.enter();
            tracing::warn!(
                text = nasty,
                shown = %nasty,
                debug = ?nasty,
                nan = f64::NAN,
                big = u128::MAX,
                small = i128::MIN,
                negative = -7i64,
                "message with {}",
                nasty
            );
        });
        let line = &got[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["text"], nasty);
        assert_eq!(line["shown"], nasty);
        assert_eq!(line["debug"], format!("{nasty:?}"));
        assert_eq!(line["message"], format!("message with {nasty}"));
        assert_eq!(line["nan"], Value::Null);
        assert!(
            line["big"].is_number() && line["small"].is_number(),
            "{line}"
        );
        assert_eq!(line["negative"], -7);
        assert_eq!(line["span"], json!({"name": "s"}));
    }

    #[test]
    fn a_log_crate_record_keeps_its_own_target_and_no_log_fields() {
        let got = lines(|| {
            tracing_log::format_trace(
                &log::Record::builder()
                    .args(format_args!("pooling idle connection"))
                    .level(log::Level::Debug)
                    .target("hyper_util::client::pool")
                    .module_path_static(Some("hyper_util::client::pool"))
                    .file_static(Some("pool.rs"))
                    .line(Some(7))
                    .build(),
            )
            .unwrap();
        });
        assert_eq!(
            got[0],
            json!({
                "timestamp": got[0]["timestamp"],
                "level": "DEBUG",
                "message": "pooling idle connection",
                "target": "hyper_util::client::pool",
            })
        );
    }

    #[test]
    fn an_event_outside_any_span_has_no_span_key() {
        let got = lines(|| tracing::error!("alone"));
        assert_eq!(got[0]["message"], "alone");
        assert!(got[0].get("span").is_none());
    }
}
