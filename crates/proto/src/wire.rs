//! What a request from the wire may cost in memory, checked on its encoded bytes before prost
//! decodes it.
//!
//! prost allocates as it decodes: a two-byte empty element of a repeated message field becomes
//! a whole struct (and a share of a `Vec` that doubles as it grows), so a 32 MiB request of
//! empty elements would cost gigabytes. [`BoundedCodec`] walks a request's protobuf encoding
//! first, guided by the compiled descriptors of `proto/`, and refuses it with
//! `RESOURCE_EXHAUSTED` when
//! - a repeated field holds more elements than its limit (the serving node's [`FieldLimits`];
//!   every repeated field of every request has one, [`DEFAULT_REPEATED_MAX`] unless set), or
//! - the decoded message would take more than [`AMPLIFICATION`] × its encoded size +
//!   [`DECODED_FLOOR`] bytes (structs, strings, and `Vec` growth counted at twice their
//!   length).
//!
//! Only the inputs of the services' methods (requests, and the chunks of a client stream) are
//! checked: they are what a server decodes from others. A client decodes responses unchecked.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock, RwLock};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};

/// Elements a repeated field of a request may hold unless [`set_field_limit`] says otherwise.
pub const DEFAULT_REPEATED_MAX: u32 = 10_000;
/// A decoded request may take at most this many times its encoded size …
pub const AMPLIFICATION: u64 = 16;
/// … plus this many bytes.
pub const DECODED_FLOOR: u64 = 4 << 20;
/// Deepest nesting of messages walked.
const MAX_DEPTH: usize = 32;

/// How a field is stored once decoded.
#[derive(Debug, Clone)]
enum Kind {
    /// A number, bool or enum: `width` bytes in memory; `fixed` when encoded in `width` bytes
    /// (fixed32, double, …) rather than as a varint.
    Scalar {
        width: u64,
        fixed: bool,
    },
    String,
    Bytes,
    Message(String),
}

#[derive(Debug, Clone)]
struct Field {
    /// `package.Message.field`, for messages and limits.
    name: String,
    kind: Kind,
    repeated: bool,
}

#[derive(Debug, Default)]
struct MessageInfo {
    /// Size of the decoded struct, roughly (fields' in-memory sizes).
    size: u64,
    fields: HashMap<u32, Field>,
}

#[derive(Debug, Default)]
struct Schema {
    messages: HashMap<String, MessageInfo>,
    /// Message types some method takes as input.
    inbound: std::collections::HashSet<String>,
}

impl Schema {
    fn build(set: &prost_types::FileDescriptorSet) -> Schema {
        let mut s = Schema::default();
        let mut raw: HashMap<String, Vec<prost_types::FieldDescriptorProto>> = HashMap::new();
        fn visit(
            prefix: &str,
            m: &prost_types::DescriptorProto,
            raw: &mut HashMap<String, Vec<prost_types::FieldDescriptorProto>>,
        ) {
            let name = format!("{prefix}.{}", m.name());
            raw.insert(name.clone(), m.field.clone());
            for n in &m.nested_type {
                visit(&name, n, raw);
            }
        }
        for f in &set.file {
            for m in &f.message_type {
                visit(f.package(), m, &mut raw);
            }
            for svc in &f.service {
                for method in &svc.method {
                    s.inbound
                        .insert(method.input_type().trim_start_matches('.').to_string());
                }
            }
        }
        for (name, fields) in &raw {
            let mut info = MessageInfo::default();
            for f in fields {
                let repeated = f.label() == Label::Repeated;
                let kind = match f.r#type() {
                    Type::String => Kind::String,
                    Type::Bytes => Kind::Bytes,
                    Type::Message | Type::Group => {
                        Kind::Message(f.type_name().trim_start_matches('.').to_string())
                    }
                    Type::Double | Type::Fixed64 | Type::Sfixed64 => Kind::Scalar {
                        width: 8,
                        fixed: true,
                    },
                    Type::Float | Type::Fixed32 | Type::Sfixed32 => Kind::Scalar {
                        width: 4,
                        fixed: true,
                    },
                    Type::Int64 | Type::Uint64 | Type::Sint64 => Kind::Scalar {
                        width: 8,
                        fixed: false,
                    },
                    _ => Kind::Scalar {
                        width: 4,
                        fixed: false,
                    },
                };
                info.size += match (&kind, repeated) {
                    (_, true) => 24,
                    (Kind::Scalar { width, .. }, false) => 8.max(*width),
                    (Kind::String, false) => 24,
                    (Kind::Bytes, false) => 32,
                    // Counted when present, as the walk meets it.
                    (Kind::Message(_), false) => 8,
                };
                info.fields.insert(
                    f.number() as u32,
                    Field {
                        name: format!("{name}.{}", f.name()),
                        kind,
                        repeated,
                    },
                );
            }
            s.messages.insert(name.clone(), info);
        }
        s
    }
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let set = prost_types::FileDescriptorSet::decode(crate::api::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptors decode");
        Schema::build(&set)
    })
}

fn limits() -> &'static RwLock<Arc<HashMap<String, u32>>> {
    static LIMITS: OnceLock<RwLock<Arc<HashMap<String, u32>>>> = OnceLock::new();
    LIMITS.get_or_init(RwLock::default)
}

/// The element limits of repeated request fields that one node's servers apply: a node sets
/// them around every call it serves ([`FieldLimits::scope`]), so that two nodes in one process
/// (as `runnel local` runs) each keep their own. Fields not named keep
/// [`DEFAULT_REPEATED_MAX`].
#[derive(Debug, Clone, Default)]
pub struct FieldLimits(Arc<HashMap<String, u32>>);

tokio::task_local! {
    static SCOPE: FieldLimits;
}

impl FieldLimits {
    /// Limits from (`package.Message.field`, most elements) pairs.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        FieldLimits(Arc::new(
            pairs.into_iter().map(|(f, n)| (f.to_string(), n)).collect(),
        ))
    }

    /// Runs `fut` (a call being served) with these limits for every request it decodes.
    pub fn scope<F: std::future::Future>(
        &self,
        fut: F,
    ) -> tokio::task::futures::TaskLocalFuture<FieldLimits, F> {
        SCOPE.scope(self.clone(), fut)
    }
}

/// The limits in force: the serving node's ([`FieldLimits::scope`]), else the process-wide
/// ones of [`set_field_limit`].
fn current_limits() -> Arc<HashMap<String, u32>> {
    SCOPE
        .try_with(|l| Arc::clone(&l.0))
        .unwrap_or_else(|_| Arc::clone(&limits().read().expect("wire limits lock")))
}

/// Sets the most elements the repeated field `field` (`package.Message.field`) of a request may
/// hold wherever no [`FieldLimits`] are in scope (a server outside a node, tests).
pub fn set_field_limit(field: &str, max: u32) {
    let mut l = limits().write().expect("wire limits lock");
    let mut m = (**l).clone();
    m.insert(field.to_string(), max);
    *l = Arc::new(m);
}

/// The element limit of the repeated field `field` in force here.
pub fn field_limit(field: &str) -> u32 {
    current_limits()
        .get(field)
        .copied()
        .unwrap_or(DEFAULT_REPEATED_MAX)
}

struct Walker<'a> {
    schema: &'a Schema,
    limits: Arc<HashMap<String, u32>>,
    cost: u64,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

impl Walker<'_> {
    fn limit(&self, f: &Field) -> u64 {
        u64::from(
            self.limits
                .get(&f.name)
                .copied()
                .unwrap_or(DEFAULT_REPEATED_MAX),
        )
    }

    /// Walks one encoded message of type `ty`, adding what its decoding allocates.
    fn walk(&mut self, buf: &[u8], ty: &str, depth: usize) -> Result<(), Refusal> {
        if depth > MAX_DEPTH {
            return Err(Refusal::Limit(format!(
                "messages nested deeper than {MAX_DEPTH}"
            )));
        }
        let Some(info) = self.schema.messages.get(ty) else {
            return Ok(()); // a type not of ours (none today): prost bounds it by its size
        };
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let mut pos = 0;
        while pos < buf.len() {
            let key = varint(buf, &mut pos)?;
            let (number, wire_type) = ((key >> 3) as u32, key & 7);
            let field = info.fields.get(&number);
            let mut elements = 1u64;
            match wire_type {
                0 => {
                    varint(buf, &mut pos)?;
                }
                1 => pos += 8,
                5 => pos += 4,
                2 => {
                    let len = varint(buf, &mut pos)?;
                    let end = pos
                        .checked_add(usize::try_from(len).map_err(|_| "length overflows")?)
                        .filter(|e| *e <= buf.len())
                        .ok_or("a length runs past the message")?;
                    let body = &buf[pos..end];
                    pos = end;
                    if let Some(f) = field {
                        match &f.kind {
                            Kind::Message(t) => {
                                let size = self.schema.messages.get(t).map_or(0, |m| m.size);
                                // A repeated element lives in a Vec that may have doubled.
                                self.cost += if f.repeated { 2 * size } else { size };
                                self.walk(body, t, depth + 1)?;
                            }
                            Kind::String => {
                                if std::str::from_utf8(body).is_err() {
                                    return Err(Refusal::Malformed(format!(
                                        "{} is not valid UTF-8",
                                        short(&f.name)
                                    )));
                                }
                                self.cost += body.len() as u64 + if f.repeated { 48 } else { 0 };
                            }
                            Kind::Bytes => {
                                self.cost += if f.repeated { 64 } else { 0 };
                            }
                            Kind::Scalar { width, fixed } => {
                                // Packed: one element per varint (or per `width` bytes).
                                elements = if *fixed {
                                    body.len() as u64 / width
                                } else {
                                    body.iter().filter(|b| **b & 0x80 == 0).count() as u64
                                };
                                self.cost += 2 * width * elements;
                            }
                        }
                    }
                }
                3 | 4 => return Err("protobuf groups are not accepted".into()),
                _ => return Err(format!("invalid wire type {wire_type}").into()),
            }
            if pos > buf.len() {
                return Err("a field runs past the message".into());
            }
            if let Some(f) = field.filter(|f| f.repeated) {
                let n = counts.entry(number).or_default();
                *n += elements;
                if wire_type != 2 {
                    self.cost += 16;
                }
                let max = self.limit(f);
                if *n > max {
                    return Err(Refusal::Limit(format!(
                        "{} holds more than {max} elements (its limit)",
                        short(&f.name)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Why [`check`] refuses a request: it is not valid protobuf for its type (answered with
/// `INVALID_ARGUMENT`), or it breaks a limit (`RESOURCE_EXHAUSTED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not valid protobuf, or a string field that is not UTF-8.
    Malformed(String),
    /// More elements, nesting or decoded size than allowed.
    Limit(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(m) | Refusal::Limit(m) => f.write_str(m),
        }
    }
}

impl From<String> for Refusal {
    fn from(m: String) -> Self {
        Refusal::Malformed(m)
    }
}

impl From<&str> for Refusal {
    fn from(m: &str) -> Self {
        Refusal::Malformed(m.into())
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Malformed(m) => Status::invalid_argument(m),
            Refusal::Limit(m) => Status::resource_exhausted(m),
        }
    }
}

/// `runnel.v1.ProduceRequest` → `ProduceRequest`.
fn message_name(ty: &str) -> &str {
    ty.rsplit('.').next().unwrap_or(ty)
}

/// `runnel.v1.ProduceRequest.records` → `ProduceRequest.records`.
fn short(name: &str) -> &str {
    let mut parts = name.rsplitn(3, '.');
    let _ = parts.next();
    let _ = parts.next();
    match parts.next() {
        Some(pkg) => &name[pkg.len() + 1..],
        None => name,
    }
}

/// Checks the encoded message `buf` of type `ty` (`package.Message`) against the limits.
///
/// # Errors
/// A message saying which limit the request breaks, or why it is not valid protobuf.
pub fn check(ty: &str, buf: &[u8]) -> Result<(), String> {
    inspect(ty, buf).map_err(|r| r.to_string())
}

/// [`check`], saying whether the request is malformed or over a limit.
///
/// # Errors
/// The [`Refusal`], with a message naming the field or limit.
pub fn inspect(ty: &str, buf: &[u8]) -> Result<(), Refusal> {
    let schema = schema();
    if !schema.inbound.contains(ty) {
        return Ok(());
    }
    let limits = current_limits();
    let mut w = Walker {
        schema,
        limits,
        cost: schema.messages.get(ty).map_or(0, |m| m.size),
    };
    w.walk(buf, ty, 0)?;
    let allowed = AMPLIFICATION * buf.len() as u64 + DECODED_FLOOR;
    if w.cost > allowed {
        return Err(Refusal::Limit(format!(
            "a {}-byte {} would take about {} bytes decoded, more than {AMPLIFICATION} × its size + {DECODED_FLOOR}",
            buf.len(),
            message_name(ty),
            w.cost
        )));
    }
    Ok(())
}

/// tonic's prost codec with requests checked by [`check`] before they are decoded.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + prost::Name + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(Default::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder { _pd: PhantomData }
    }
}

/// The decoder of [`BoundedCodec`].
#[derive(Debug, Clone, Default)]
pub struct BoundedDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + prost::Name> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf;
        let remaining = buf.remaining();
        let chunk = buf.chunk();
        // tonic hands over one contiguous message; check all of it.
        if chunk.len() >= remaining {
            inspect(&U::full_name(), &chunk[..remaining])?;
        } else {
            let copy = buf.copy_to_bytes(remaining);
            inspect(&U::full_name(), &copy)?;
            return U::decode(copy)
                .map(Some)
                .map_err(|e| Status::invalid_argument(e.to_string()));
        }
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api;

    fn encoded<M: Message>(m: &M) -> Vec<u8> {
        m.encode_to_vec()
    }

    #[test]
    fn an_ordinary_produce_passes() {
        let r = api::ProduceRequest {
            topic: "t".into(),
            records: (0..1000)
                .map(|i| api::Record {
                    key: Some(format!("k{i}").into_bytes().into()),
                    value: Some(vec![7u8; 100].into()),
                    headers: vec![api::Header {
                        key: "h".into(),
                        value: b"v".to_vec().into(),
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        check("runnel.v1.ProduceRequest", &encoded(&r)).unwrap();
    }

    #[test]
    fn too_many_elements_are_refused_before_decoding() {
        let r = api::MetadataRequest {
            topics: vec![String::new(); DEFAULT_REPEATED_MAX as usize + 1],
        };
        let e = check("runnel.v1.MetadataRequest", &encoded(&r)).unwrap_err();
        assert!(e.contains("MetadataRequest.topics"), "{e}");
        let one_header_too_many = api::ProduceRequest {
            records: vec![api::Record {
                headers: vec![api::Header::default(); DEFAULT_REPEATED_MAX as usize + 1],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = check("runnel.v1.ProduceRequest", &encoded(&one_header_too_many)).unwrap_err();
        assert!(e.contains("Record.headers"), "{e}");
    }

    #[tokio::test]
    async fn a_request_that_would_grow_many_times_its_size_is_refused() {
        // Scoped, not set_field_limit: tests of this file share a process under `cargo test`.
        let limits = FieldLimits::new([("runnel.v1.CommitOffsetsRequest.offsets", 10_000_000)]);
        // Empty elements: two bytes each on the wire, a struct each in memory.
        let r = api::CommitOffsetsRequest {
            offsets: vec![api::PartitionOffset::default(); 1_000_000],
            ..Default::default()
        };
        let e = limits
            .scope(async { check("runnel.v1.CommitOffsetsRequest", &encoded(&r)) })
            .await
            .unwrap_err();
        assert!(e.contains("decoded"), "{e}");
    }

    #[tokio::test]
    async fn each_node_keeps_its_own_limits() {
        let field = "runnel.v1.MetadataRequest.topics";
        let r = api::MetadataRequest {
            topics: vec!["t".into(); 3],
        };
        let small = FieldLimits::new([(field, 2)]);
        let large = FieldLimits::new([(field, 5)]);
        let (a, b) = tokio::join!(
            small.scope(async { check("runnel.v1.MetadataRequest", &encoded(&r)) }),
            large.scope(async { check("runnel.v1.MetadataRequest", &encoded(&r)) }),
        );
        assert!(a.unwrap_err().contains("more than 2"));
        b.unwrap();
        assert_eq!(small.scope(async { field_limit(field) }).await, 2);
    }

    #[test]
    fn responses_are_not_checked() {
        let r = api::MetadataResponse {
            topics: vec![api::TopicMetadata::default(); DEFAULT_REPEATED_MAX as usize + 1],
            ..Default::default()
        };
        check("runnel.v1.MetadataResponse", &encoded(&r)).unwrap();
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[0xffu8; 11][..],
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0x0b][..],
            &[0x22, 0x05, 0x0a][..],
        ] {
            assert!(
                check("runnel.v1.ProduceRequest", bytes).is_err(),
                "{bytes:?}"
            );
        }
    }
}
