//! Random access to the members of an uncompressed tar (OCI and Docker archives):
//! one scan records each regular member's data offset and size, then members are
//! read straight from the archive file. Nothing is extracted to disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::layer::Compression;

pub struct TarIndex {
    path: PathBuf,
    members: HashMap<String, (u64, u64)>,
}

impl TarIndex {
    pub fn scan(path: &Path) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut magic = [0u8; 6];
        let n = file.read(&mut magic)?;
        let compression = Compression::sniff(&magic[..n]);
        if compression != Compression::Plain {
            bail!(
                "{}: the archive itself is {compression:?}-compressed; decompress it first \
                 (image archives are plain tar files)",
                path.display()
            );
        }
        file.seek(SeekFrom::Start(0))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        for entry in archive
            .entries()
            .with_context(|| format!("{}: not a tar archive", path.display()))?
        {
            let entry =
                entry.with_context(|| format!("{}: corrupt tar archive", path.display()))?;
            if !matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            ) {
                continue;
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let name = name.trim_start_matches("./").to_string();
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            members,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    pub fn size(&self, name: &str) -> Option<u64> {
        self.members.get(name).map(|m| m.1)
    }

    pub fn open(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        let Some(&(offset, size)) = self.members.get(name) else {
            bail!("{}: no member '{name}'", self.path.display());
        };
        let mut file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(offset))?;
        Ok(Box::new(file.take(size)))
    }

    pub fn read(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        if self.size(name).unwrap_or(0) > max {
            bail!(
                "{}: member '{name}' is larger than {max} bytes",
                self.path.display()
            );
        }
        let mut out = Vec::new();
        self.open(name)?.read_to_end(&mut out)?;
        Ok(out)
    }
}
