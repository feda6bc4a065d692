//! openraft's storage conformance suite against Runnel's WAL log store and state machine.

use openraft::testing::log::{StoreBuilder, Suite};
use runnel_raft::{GroupStore, LogStore, StateMachine, TypeConfig};
use runnel_storage::LogConfig;
use runnel_storage::wal::{Wal, WalConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachine), openraft::StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).expect("wal");
        let store = GroupStore::open(&dir.path().join("sm"), LogConfig::default()).expect("sm");
        Ok((dir, LogStore::new(wal), StateMachine::new(store)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("storage suite");
}
