//! Where uploads go and downloads come from.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::body::{self, ByteStream};
use super::validate_file_name;
use crate::{Error, ErrorKind};

/// The server's storage: receives uploads as streams and serves downloads as
/// streams, so no file has to fit in memory.
///
/// Names reach the store already checked by [`validate_file_name`].
#[async_trait]
pub trait FileStore: Send + Sync + 'static {
    /// Stores the upload `name`, consuming `chunks` as they arrive, and
    /// returns the number of bytes stored. An error in `chunks` means the
    /// upload broke off: nothing must be left under `name`.
    ///
    /// The future may also be dropped at any await (hyper cancels a request
    /// whose stream the client reset), so clean-up belongs in a `Drop` guard,
    /// not after the loop.
    async fn put(&self, name: &str, chunks: ByteStream) -> Result<u64, Error>;

    /// Like [`put`](Self::put), but only when no file `name` exists:
    /// `Ok(None)` when one does, which is left as it was.
    ///
    /// The default asks [`get`](Self::get) first and then puts, so two
    /// uploads of one new name at once may both succeed, the last one
    /// winning; a store that can create a name atomically (as [`DirStore`]
    /// does) overrides it.
    async fn put_new(&self, name: &str, chunks: ByteStream) -> Result<Option<u64>, Error> {
        match self.get(name).await {
            Ok(_) => Ok(None),
            Err(error) if error.kind() == ErrorKind::NotFound => {
                self.put(name, chunks).await.map(Some)
            }
            Err(error) => Err(error),
        }
    }

    /// The content of `name` and its length when known, or an error of kind
    /// [`ErrorKind::NotFound`].
    async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error>;
}

/// A [`FileStore`] on a directory: one file per name.
///
/// An upload is written to a temporary file and renamed into place only when
/// it is complete, so a reader never sees half a file and a broken upload
/// leaves nothing behind.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store in `root`, created if it does not exist.
    pub async fn new(root: impl AsRef<Path>) -> Result<Self, Error> {
        let root = root.as_ref().to_path_buf();
        tokio::fs::create_dir_all(&root).await.map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("cannot create {}: {error}", root.display()),
            )
            .with_source(error)
        })?;
        Ok(Self { root })
    }

    /// The directory the files are in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf, Error> {
        validate_file_name(name)?;
        Ok(self.root.join(name))
    }
}

#[async_trait]
impl FileStore for DirStore {
    async fn put(&self, name: &str, chunks: ByteStream) -> Result<u64, Error> {
        let path = self.path(name)?;
        let (partial, written) = self.write_partial(name, chunks).await?;
        tokio::fs::rename(partial.path(), &path)
            .await
            .map_err(write_error)?;
        partial.keep();
        Ok(written)
    }

    /// Links the complete upload into place, which fails when the name
    /// exists: no check-then-write race between two uploads.
    async fn put_new(&self, name: &str, chunks: ByteStream) -> Result<Option<u64>, Error> {
        let path = self.path(name)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            // Refused before a byte is written.
            return Ok(None);
        }
        let (partial, written) = self.write_partial(name, chunks).await?;
        match tokio::fs::hard_link(partial.path(), &path).await {
            // The partial's guard removes the other name.
            Ok(()) => Ok(Some(written)),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(write_error(error)),
        }
    }

    async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error> {
        let path = self.path(name)?;
        let (file, len) = body::open(&path).await?;
        Ok((body::file_chunks(file), Some(len)))
    }
}

impl DirStore {
    /// Writes `chunks` to a temporary file of the store, removed when the
    /// returned guard drops unless kept.
    async fn write_partial(
        &self,
        name: &str,
        mut chunks: ByteStream,
    ) -> Result<(Partial, u64), Error> {
        // A dot-name never collides with a stored file (names cannot start
        // with a dot), and the uuid keeps concurrent uploads apart.
        let partial_path = self
            .root
            .join(format!(".{name}.{}.partial", uuid::Uuid::new_v4()));
        let partial = Partial(Some(partial_path.clone()));
        let mut file = tokio::fs::File::create(&partial_path)
            .await
            .map_err(write_error)?;
        let mut written = 0_u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            file.write_all(&chunk).await.map_err(write_error)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        drop(file);
        Ok((partial, written))
    }
}

/// The temporary file of an upload in progress, removed unless kept.
///
/// An upload ends early not only by an error but also by cancellation: when
/// the client resets the stream, hyper drops the request's future at its
/// next await, so clean-up code after the loop would never run. Dropping
/// this guard is what removes the file in every case.
struct Partial(Option<PathBuf>);

impl Partial {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("a partial not yet kept")
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // One unlink, synchronously: spawning it would let a caller see
            // the file after the upload has ended.
            let _already_gone = std::fs::remove_file(path);
        }
    }
}

fn write_error(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Unavailable, format!("writing the file: {error}")).with_source(error)
}
