//! Bad input at the edge, over real mTLS: bytes that are not protobuf or
//! not UTF-8, and a flood of concurrent streams from one client. The server
//! answers each with a status and stays up.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use bytes::{Buf, BufMut};
use common::TestVault;
use tokenvault::proto::v1::{TokenizeItem, TokenizeRequest};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default, Clone)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining()).to_vec();
        Ok(Some(bytes))
    }
}

async fn raw_call(vault: &TestVault, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = vault.channel_with(&vault.pki.tls("support")).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/tokenvault.v1.TokenVault/Tokenize");
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// A TokenizeRequest with one item whose value is `value` (raw bytes).
fn request_with_value(value: &[u8]) -> Vec<u8> {
    let mut item = vec![0x0a, 5];
    item.extend_from_slice(b"email");
    item.push(0x12);
    item.push(u8::try_from(value.len()).unwrap());
    item.extend_from_slice(value);
    let mut body = vec![0x0a, u8::try_from(item.len()).unwrap()];
    body.extend_from_slice(&item);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_non_utf8_requests_get_a_status_and_the_server_stays_up() {
    let vault = TestVault::start();
    // A well-formed request through the raw codec works, so the failures
    // below are about the bytes.
    raw_call(&vault, request_with_value(b"raw@example.com"))
        .await
        .unwrap();

    // Invalid UTF-8 in a string field: prost refuses to decode it, and tonic
    // answers before any handler runs (documented in the README).
    let status = raw_call(&vault, request_with_value(b"\xff\xfe@example.com"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("decode"), "{}", status.message());
    // Not protobuf at all.
    let status = raw_call(&vault, vec![0xff; 64]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    // An empty message is an empty request: no items.
    let status = raw_call(&vault, Vec::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    raw_call(&vault, request_with_value(b"still@example.com"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_concurrent_streams_is_bounded_per_identity() {
    let vault = TestVault::start_with("[limits]\nper_identity_concurrency = 32\n");
    let mut client = vault.client("checkout").await;
    // One call first, so that the connection has the server's HTTP/2
    // settings (its stream limit) before the flood: before them the client
    // may open more streams than the server takes, and those it refuses
    // (REFUSED_STREAM) before any limit of the vault's is reached.
    client
        .tokenize(TokenizeRequest {
            items: vec![TokenizeItem {
                field_type: "email".into(),
                value: "first@example.com".into(),
                subject_id: String::new(),
                ttl_seconds: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let calls: Vec<_> = (0..600)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let item = TokenizeItem {
                    field_type: "email".into(),
                    value: format!("flood{i}@example.com"),
                    subject_id: String::new(),
                    ttl_seconds: 0,
                };
                client
                    .tokenize(TokenizeRequest {
                        items: vec![item],
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => ok += 1,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                // The refusal names the limit and says when to come back.
                assert!(
                    status.message().contains("limits.per_identity_concurrency"),
                    "{}",
                    status.message()
                );
                let retry: u64 = status
                    .metadata()
                    .get("retry-after-ms")
                    .expect("retry-after-ms")
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry > 0, "retry-after-ms {retry}");
                limited += 1;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert_eq!(ok + limited, 600);
    assert!(ok >= 32, "{ok} succeeded");
    // 600 calls at once against a limit of 32 in flight: without the limit
    // every call would succeed.
    assert!(limited > 0, "the concurrency limit never refused a call");
    // The server is up, another identity is unaffected, and memory stayed bounded.
    let mut support = vault.client("support").await;
    support
        .tokenize(TokenizeRequest {
            items: vec![TokenizeItem {
                field_type: "email".into(),
                value: "after@example.com".into(),
                subject_id: String::new(),
                ttl_seconds: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", vault.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kib < 512 * 1024, "peak RSS {rss_kib} KiB");
}
