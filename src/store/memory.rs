//! The `memory` backend: in this process only (tests, the demo).

use dashmap::DashMap;

use super::TokenRecord;

/// In-process store.
#[derive(Default)]
pub struct MemoryStore {
    pub(super) tokens: DashMap<[u8; 32], TokenRecord>,
    pub(super) ids: DashMap<String, [u8; 32]>,
    /// x509 DN → accounts (see `identities`).
    pub(super) identities: DashMap<String, Vec<String>>,
    /// Named random keys (see `keys`).
    pub(super) keys: DashMap<String, [u8; 32]>,
}
