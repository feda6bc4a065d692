//! Rust client for Runnel.
//!
//! - [`Client`]: connections to the cluster and a metadata cache (partition → leader address),
//!   refreshed on `NOT_LEADER` hints and on errors.
//! - [`Producer`]: batching (linger, max batch size), key → partition with Kafka's murmur2,
//!   **idempotent by default** (producer id + per-partition sequences, so retries never
//!   duplicate), retries with backoff on retriable errors, bounded in-flight requests.
//! - [`Consumer`]: assign partitions, start from committed / earliest / latest / offset / time,
//!   poll, commit, seek; resumes after a leader change at its exact position.
//! - [`Admin`]: create, delete, list and describe topics; cluster status; leader transfer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runnel_client::Error> {
//! use runnel_client::{Client, ProducerRecord, StartFrom, TopicSpec};
//! let client = Client::connect(["127.0.0.1:9092"]).await?;
//! client.admin().create_topic("orders", TopicSpec::partitions(3)).await?;
//! let producer = client.producer(Default::default());
//! let ack = producer.send("orders", ProducerRecord::new("hello").key("k1")).await?.await?;
//! println!("written at partition {} offset {}", ack.partition, ack.offset);
//! let mut consumer = client.consumer(runnel_client::ConsumerConfig::group("billing"));
//! consumer.assign("orders", None, StartFrom::Earliest).await?;
//! for r in consumer.poll().await? {
//!     println!("{}@{}: {:?}", r.partition, r.offset, r.value);
//! }
//! consumer.commit().await?;
//! # Ok(()) }
//! ```

mod admin;
mod connection;
mod consumer;
mod error;
mod producer;

pub use admin::{Admin, TopicSpec};
pub use connection::{Client, ClientConfig};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, StartFrom};
pub use error::Error;
pub use producer::{Delivery, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
pub use runnel_proto::api;
pub use runnel_proto::api::ErrorCode;
