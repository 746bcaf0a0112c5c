//! The one verifying receiver: a file streamed in chunks is written to a private part
//! file, hashed as it arrives, and checked against its declared size and digest before
//! it may take its name. Worker uploads (`uploads.rs`) and the operator's blob uploads
//! (`control_service.rs`) both receive through it. Handlers run its file I/O on the
//! blocking pool (`status::blocking`), never on the async runtime.

use super::status;
use std::io::Write;
use std::path::{Path, PathBuf};
use tonic::Status;

/// A file being received into a part file; the part file is removed unless the file is
/// verified and moved to its name.
pub(super) struct Receiving {
    /// What the sender calls it (for messages).
    pub(super) name: String,
    part: PathBuf,
    file: Option<std::fs::File>,
    hasher: blake3::Hasher,
    /// Bytes received so far.
    pub(super) written: u64,
    size: u64,
    digest: String,
}

impl Receiving {
    /// Starts receiving `name` (`size` bytes hashing to `digest`) into a new part file
    /// with a private random name in `dir`: two uploads never share one.
    pub(super) fn create(
        name: String,
        dir: &Path,
        size: u64,
        digest: String,
    ) -> Result<Self, Status> {
        std::fs::create_dir_all(dir).map_err(status::io("create", dir))?;
        let mut rnd = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
        let part = dir.join(format!(".part-{}", hex::encode(rnd)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .map_err(status::io("create", &part))?;
        Ok(Self {
            name,
            part,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            written: 0,
            size,
            digest,
        })
    }

    /// Appends a chunk that starts at `offset`: chunks come in order and never pass the
    /// declared size.
    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Status> {
        if offset != self.written {
            return Err(Status::invalid_argument(format!(
                "{}: chunk at {offset} but {} bytes written",
                self.name, self.written
            )));
        }
        if self.written + data.len() as u64 > self.size {
            return Err(Status::resource_exhausted(format!(
                "{}: more bytes than declared",
                self.name
            )));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(Status::internal(format!("{}: already finished", self.name)));
        };
        self.hasher.update(data);
        file.write_all(data)
            .map_err(|e| status::io("write", Path::new(&self.name))(e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks size and digest and, when `durable`, fsyncs the bytes. A mismatch is
    /// `DATA_LOSS`.
    pub(super) fn verify(mut self, durable: bool) -> Result<Verified, Status> {
        if self.written != self.size {
            return Err(Status::data_loss(format!(
                "upload of {} ended at {} of {} bytes",
                self.name, self.written, self.size
            )));
        }
        let got = nexa_shared::digest::format(&self.hasher.finalize());
        if got != self.digest {
            return Err(Status::data_loss(format!(
                "upload of {} is {got}, not the declared {}",
                self.name, self.digest
            )));
        }
        if let Some(file) = self.file.take()
            && durable
        {
            file.sync_all()
                .map_err(|e| status::io("fsync", Path::new(&self.name))(e))?;
        }
        Ok(Verified {
            part: std::mem::take(&mut self.part),
            written: self.written,
        })
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        // Unfinished or refused: the part file goes (once verified, `Verified` owns it).
        self.file = None;
        if !self.part.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// A complete, verified part file (fsynced when asked), waiting to take its name; removed if it
/// never does.
pub(super) struct Verified {
    part: PathBuf,
    /// Its size.
    pub(super) written: u64,
}

impl Verified {
    /// Renames it to `dest`.
    pub(super) fn rename_to(mut self, dest: &Path) -> Result<u64, Status> {
        let part = std::mem::take(&mut self.part);
        std::fs::rename(&part, dest).map_err(status::io("rename", &part))?;
        Ok(self.written)
    }
}

impl Drop for Verified {
    fn drop(&mut self) {
        if !self.part.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}
