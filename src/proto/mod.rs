//! The gRPC types of package `tasker.v1` (messages, clients, servers), the encoded descriptor
//! set that server reflection serves so `grpcurl list` works without proto files, and the
//! conversions a client needs: JSON documents <-> `google.protobuf.Struct`, times <->
//! `Timestamp` / `Duration`, and (in [`words`]) the enums' values <-> the service's words.

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod tasker {
    pub mod v1 {
        tonic::include_proto!("tasker.v1");
    }
}

pub use tasker::v1;

pub mod words;
pub use words::Vocabulary;

/// The codec of every `tasker.v1` service: prost's, except that a request that is not a valid
/// protobuf message (truncated, wrong wire types, a `Struct` nested deeper than the decoder's
/// recursion limit) answers INVALID_ARGUMENT, as the caller's fault, instead of tonic's
/// INTERNAL. A response that fails to decode on the client stays INTERNAL.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::Status;
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    #[derive(Debug, Clone)]
    pub struct TaskerCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for TaskerCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for TaskerCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = RequestDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            RequestDecoder(ProstDecoder::default())
        }
    }

    /// prost's decoder with the status of a malformed message chosen by who sent it.
    #[derive(Debug)]
    pub struct RequestDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|status| {
                // Servers decode `*Request` messages, clients everything else.
                if std::any::type_name::<U>().ends_with("Request") {
                    Status::invalid_argument(format!(
                        "the request is not a valid protobuf message: {}",
                        status.message()
                    ))
                } else {
                    status
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// The `FileDescriptorSet` of every proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tasker_descriptor.bin"));

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf Timestamp as a time; `None` for one out of range (nanos negative or too large).
pub fn datetime(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A protobuf Duration in whole milliseconds, signed (a negative one stays negative, for
/// the caller's rule to name), saturating.
pub fn duration_ms(d: &prost_types::Duration) -> i64 {
    d.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos) / 1_000_000)
}

/// Signed milliseconds as a protobuf Duration (seconds and nanos of the same sign).
pub fn duration_from_ms(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A Struct as a JSON object (absent: empty object).
pub fn struct_to_json(s: Option<prost_types::Struct>) -> Value {
    match s {
        Some(s) => Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, value_to_json(v)))
                .collect(),
        ),
        None => Value::Object(Map::new()),
    }
}

fn value_to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            // integral values stay integers so they round-trip through JSON unchanged
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::StructValue(s)) => struct_to_json(Some(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
    }
}

/// A JSON object as a Struct; other JSON values are wrapped as `{"value": ...}`.
pub fn json_to_struct(v: &Value) -> prost_types::Struct {
    match v {
        Value::Object(m) => prost_types::Struct {
            fields: m
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        other => prost_types::Struct {
            fields: [("value".to_string(), json_to_value(other))]
                .into_iter()
                .collect(),
        },
    }
}

pub fn opt_json_to_struct(v: Option<&Value>) -> Option<prost_types::Struct> {
    v.map(json_to_struct)
}

fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Bytes `json_to_struct(v)` takes encoded (what a document costs as sent), computed from the
/// JSON without building the message.
pub fn struct_encoded_len(v: &Value) -> usize {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| field_len(entry_len(k, v))).sum(),
        other => field_len(entry_len("value", other)),
    }
}

/// Bytes `json_to_value(v)` takes encoded: a results document as a child receives it in its
/// parent_results (a Struct in a Value).
pub fn value_encoded_len(v: &Value) -> usize {
    match v {
        Value::Null => 2,
        Value::Bool(_) => 2,
        Value::Number(_) => 9,
        Value::String(s) => field_len(s.len()),
        Value::Array(a) => field_len(a.iter().map(|v| field_len(value_encoded_len(v))).sum()),
        Value::Object(_) => field_len(struct_encoded_len(v)),
    }
}

/// One map entry of a Struct: the key (left out when empty, as prost does) and the value.
fn entry_len(key: &str, value: &Value) -> usize {
    let key = if key.is_empty() {
        0
    } else {
        field_len(key.len())
    };
    key + field_len(value_encoded_len(value))
}

/// A length-delimited field of `len` bytes with a one-byte tag.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoded_length_is_computed_without_encoding() {
        use prost::Message;
        let docs = [
            serde_json::json!({}),
            serde_json::json!({"": null, "a": 1, "b": [true, null, "x", 2.5, [], {}], "c": {"d": -3}}),
            serde_json::json!({"long": "x".repeat(300), "list": vec![0; 200]}),
            serde_json::json!([1, 2]),
        ];
        for d in docs {
            assert_eq!(
                struct_encoded_len(&d),
                json_to_struct(&d).encoded_len(),
                "{d}"
            );
            assert_eq!(
                value_encoded_len(&d),
                json_to_value(&d).encoded_len(),
                "{d}"
            );
        }
    }

    #[test]
    fn json_round_trips_through_struct() {
        let v = serde_json::json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -3}});
        assert_eq!(struct_to_json(Some(json_to_struct(&v))), v);
    }
}
