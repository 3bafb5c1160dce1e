//! The JSON Lines file sink.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::usage::{CloudEvent, SinkError, UsageSink};

/// Appends each event to a file as one line of JSON (JSON Lines), creating the file if
/// needed. Each batch is written with one `write_all` and flushed before it counts as
/// delivered.
#[derive(Debug, Clone)]
pub struct FileSink {
    path: PathBuf,
}

impl FileSink {
    /// A sink appending to `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSink { path: path.into() }
    }
}

#[async_trait]
impl UsageSink for FileSink {
    async fn send(&self, batch: &[CloudEvent]) -> Result<(), SinkError> {
        let mut lines = Vec::with_capacity(batch.len() * 256);
        for event in batch {
            serde_json::to_writer(&mut lines, event).map_err(SinkError::rejected)?;
            lines.push(b'\n');
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
        file.write_all(&lines)
            .await
            .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
        file.flush()
            .await
            .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
        Ok(())
    }
}
