//! Produce a few records idempotently, consume them with a consumer group, commit, and replay
//! from an offset. Start a cluster first (`cargo run --release --bin runnel -- local`), then:
//!
//! ```sh
//! cargo run -p runnel-client --example quickstart -- 127.0.0.1:9092
//! ```

use runnel_client::{Client, ConsumerConfig, ProducerRecord, StartFrom, TopicSpec};

#[tokio::main]
async fn main() -> Result<(), runnel_client::Error> {
    let bootstrap = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let client = Client::connect([bootstrap]).await?;
    client
        .admin()
        .ensure_topic("orders", TopicSpec::partitions(3))
        .await?;

    // Idempotent by default: retries after timeouts or leader changes never duplicate.
    let producer = client.producer(Default::default());
    let mut acks = Vec::new();
    for i in 0..10 {
        let rec = ProducerRecord::new(format!("order {i}"))
            .key(format!("customer-{}", i % 3))
            .header("source", "example");
        acks.push(producer.send("orders", rec).await?);
    }
    for ack in acks {
        let d = ack.await?;
        println!(
            "acknowledged: partition {} offset {}",
            d.partition, d.offset
        );
    }
    producer.close().await;

    // At-least-once: process, then commit; a restart resumes at the commit.
    let mut consumer = client.consumer(ConsumerConfig::group("example"));
    consumer
        .assign("orders", None, StartFrom::Committed)
        .await?;
    let records = consumer.poll().await?;
    for r in &records {
        println!(
            "{}/{}: {}",
            r.partition,
            r.offset,
            String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
        );
    }
    consumer.commit().await?;

    // Replay partition 0 from offset 0 without touching the group's commit.
    let mut replay = client.consumer(ConsumerConfig::default());
    replay
        .assign("orders", Some(vec![0]), StartFrom::Offset(0))
        .await?;
    println!(
        "replayed {} records of partition 0",
        replay.poll().await?.len()
    );
    Ok(())
}
