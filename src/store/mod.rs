//! The run store (issue 3). Placeholder error type until the store lands.

/// Errors from the run store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Any store failure, with a message naming what went wrong.
    #[error("{0}")]
    Other(String),
}
