//! Device state sections: the vCPU and device state of a VM as named,
//! versioned records (like QEMU's vmstate sections or Xen's migration-v2
//! records), carried opaquely by the engine in the stop-and-copy phase.
//!
//! The VM says what it writes ([`crate::MigratableVm::save_sections`]) and
//! what it reads ([`crate::MigratableVm::section_specs`]: each section's name,
//! newest version and size limit). The destination decodes the records
//! against its own specs **before** it answers Ready, so a section it does
//! not know, a version newer than it reads, a record over its limit or one
//! whose checksum fails ends the migration before GO, with the guest still
//! running on the source.
//!
//! Wire format (the payload of the `VcpuState` frame; little-endian; see
//! `transport/PROTOCOL.md`):
//!
//! ```text
//! magic u32 = "FSEC" (0x4345_5346)   count u32 (<= MAX_SECTIONS)
//! count x record:
//!   name_len u8 (1..=MAX_NAME_LEN)   name [a-z0-9._-]
//!   instance u32                     version u32 (0 is invalid)
//!   len u32                          checksum u64 = xxh3_64(name, instance, version, data)
//!   data [len]
//! ```

use xxhash_rust::xxh3::Xxh3;

/// `"FSEC"`: the first word of a section stream.
pub const SECTIONS_MAGIC: u32 = 0x4345_5346;

/// Most records in one stream (bounds the work a hostile peer can cause:
/// 16 vCPUs with a handful of sections each fit many times over).
pub const MAX_SECTIONS: u32 = 1024;

/// Longest section name (names are short identifiers such as `vcpu`).
pub const MAX_NAME_LEN: usize = 64;

/// Bytes of a record before its data.
const RECORD_HEADER: usize = 1 + 4 + 4 + 4 + 8;

/// One section: a named, versioned piece of VM state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// What the data is, e.g. `vcpu`, `irqchip`, `pit`, `clock`.
    pub name: String,
    /// Which one of several (the vCPU index; 0 for a singleton).
    pub instance: u32,
    /// The format version of `data` (1 and up).
    pub version: u32,
    /// The state, in the format its VMM defines.
    pub data: Vec<u8>,
}

/// What a VM reads: one entry per section name it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionSpec {
    /// The section's name.
    pub name: &'static str,
    /// The newest version this VM reads (older ones it reads too).
    pub version: u32,
    /// Largest `data` accepted, bytes.
    pub max_bytes: u32,
    /// Most instances accepted (instances are `0..max_instances`).
    pub max_instances: u32,
}

/// Why a section stream is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SectionError {
    /// The stream does not start with [`SECTIONS_MAGIC`].
    #[error("device state does not start with the section magic (found {0:#010x}): a peer of another stream version?")]
    BadMagic(u32),
    /// More records than [`MAX_SECTIONS`].
    #[error("{0} device sections (at most {MAX_SECTIONS})")]
    TooMany(u32),
    /// The stream ends inside a record.
    #[error("device state truncated in record {index}")]
    Truncated {
        /// Index of the record.
        index: u32,
    },
    /// A name that is empty, too long or not `[a-z0-9._-]`.
    #[error("device section {index} has an invalid name")]
    BadName {
        /// Index of the record.
        index: u32,
    },
    /// Version 0, which no section has.
    #[error("device section `{name}` has version 0")]
    VersionZero {
        /// The section.
        name: String,
    },
    /// A section this VM does not know.
    #[error("unknown device section `{name}` (this VM reads: {known})")]
    Unknown {
        /// The section.
        name: String,
        /// The names this VM reads.
        known: String,
    },
    /// A section newer than this VM reads.
    #[error("device section `{name}` has version {version}, this VM reads up to version {ours}")]
    Newer {
        /// The section.
        name: String,
        /// Its version.
        version: u32,
        /// The newest this VM reads.
        ours: u32,
    },
    /// A record larger than its limit.
    #[error("device section `{name}` is {len} bytes, over its limit of {limit}")]
    TooLarge {
        /// The section.
        name: String,
        /// Its length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// An instance number over the section's limit.
    #[error("device section `{name}` instance {instance} (at most {max} instances)")]
    BadInstance {
        /// The section.
        name: String,
        /// Its instance.
        instance: u32,
        /// The limit.
        max: u32,
    },
    /// The same (name, instance) twice.
    #[error("device section `{name}` instance {instance} appears twice")]
    Duplicate {
        /// The section.
        name: String,
        /// Its instance.
        instance: u32,
    },
    /// The record's checksum does not match its contents.
    #[error("device section `{name}` instance {instance} fails its checksum")]
    Checksum {
        /// The section.
        name: String,
        /// Its instance.
        instance: u32,
    },
    /// Bytes after the last record.
    #[error("{0} bytes after the last device section")]
    TrailingBytes(usize),
}

fn name_ok(name: &[u8]) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

fn checksum(name: &[u8], instance: u32, version: u32, data: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(name);
    h.update(&instance.to_le_bytes());
    h.update(&version.to_le_bytes());
    h.update(data);
    h.digest()
}

/// Encodes `sections` as a section stream.
///
/// # Panics
/// If a section's name is not a valid name or its data is over 4 GiB: the
/// VMM's own sections, a programming error.
pub fn encode(sections: &[DeviceSection]) -> Vec<u8> {
    let total: usize = sections
        .iter()
        .map(|s| RECORD_HEADER + s.name.len() + s.data.len())
        .sum();
    let mut out = Vec::with_capacity(8 + total);
    out.extend_from_slice(&SECTIONS_MAGIC.to_le_bytes());
    let count = u32::try_from(sections.len()).expect("section count fits u32");
    out.extend_from_slice(&count.to_le_bytes());
    for s in sections {
        assert!(name_ok(s.name.as_bytes()), "bad section name {:?}", s.name);
        let len = u32::try_from(s.data.len()).expect("section data under 4 GiB");
        out.push(u8::try_from(s.name.len()).expect("name under 64 bytes"));
        out.extend_from_slice(s.name.as_bytes());
        out.extend_from_slice(&s.instance.to_le_bytes());
        out.extend_from_slice(&s.version.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(
            &checksum(s.name.as_bytes(), s.instance, s.version, &s.data).to_le_bytes(),
        );
        out.extend_from_slice(&s.data);
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Decodes a section stream, checking every record against `specs` (what
/// this VM reads) before any data is trusted: names, versions, size limits,
/// instances, duplicates and checksums.
pub fn decode(bytes: &[u8], specs: &[SectionSpec]) -> Result<Vec<DeviceSection>, SectionError> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.u32().ok_or(SectionError::BadMagic(0))?;
    if magic != SECTIONS_MAGIC {
        return Err(SectionError::BadMagic(magic));
    }
    let count = r.u32().ok_or(SectionError::Truncated { index: 0 })?;
    if count > MAX_SECTIONS {
        return Err(SectionError::TooMany(count));
    }
    let mut out: Vec<DeviceSection> = Vec::new();
    for index in 0..count {
        let truncated = SectionError::Truncated { index };
        let name_len = r.take(1).ok_or_else(|| truncated.clone())?[0];
        let name = r
            .take(usize::from(name_len))
            .ok_or_else(|| truncated.clone())?;
        if !name_ok(name) {
            return Err(SectionError::BadName { index });
        }
        let name_str = String::from_utf8_lossy(name).into_owned();
        let instance = r.u32().ok_or_else(|| truncated.clone())?;
        let version = r.u32().ok_or_else(|| truncated.clone())?;
        let len = r.u32().ok_or_else(|| truncated.clone())?;
        let sum = r.u64().ok_or_else(|| truncated.clone())?;
        if version == 0 {
            return Err(SectionError::VersionZero { name: name_str });
        }
        let spec = specs
            .iter()
            .find(|s| s.name.as_bytes() == name)
            .ok_or_else(|| SectionError::Unknown {
                name: name_str.clone(),
                known: specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
            })?;
        if version > spec.version {
            return Err(SectionError::Newer {
                name: name_str,
                version,
                ours: spec.version,
            });
        }
        if len > spec.max_bytes {
            return Err(SectionError::TooLarge {
                name: name_str,
                len,
                limit: spec.max_bytes,
            });
        }
        if instance >= spec.max_instances {
            return Err(SectionError::BadInstance {
                name: name_str,
                instance,
                max: spec.max_instances,
            });
        }
        if out
            .iter()
            .any(|s| s.name == name_str && s.instance == instance)
        {
            return Err(SectionError::Duplicate {
                name: name_str,
                instance,
            });
        }
        let data = r
            .take(usize::try_from(len).map_err(|_| truncated.clone())?)
            .ok_or(truncated)?;
        if checksum(name, instance, version, data) != sum {
            return Err(SectionError::Checksum {
                name: name_str,
                instance,
            });
        }
        out.push(DeviceSection {
            name: name_str,
            instance,
            version,
            data: data.to_vec(),
        });
    }
    let rest = bytes.len() - r.at;
    if rest != 0 {
        return Err(SectionError::TrailingBytes(rest));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[SectionSpec] = &[
        SectionSpec {
            name: "vcpu",
            version: 2,
            max_bytes: 64,
            max_instances: 4,
        },
        SectionSpec {
            name: "clock",
            version: 1,
            max_bytes: 16,
            max_instances: 1,
        },
    ];

    fn section(name: &str, instance: u32, version: u32, data: &[u8]) -> DeviceSection {
        DeviceSection {
            name: name.into(),
            instance,
            version,
            data: data.to_vec(),
        }
    }

    fn sample() -> Vec<DeviceSection> {
        vec![
            section("vcpu", 0, 2, b"regs of vcpu 0"),
            section("vcpu", 1, 1, b"regs of vcpu 1 (older format)"),
            section("clock", 0, 1, &7u64.to_le_bytes()),
        ]
    }

    /// Offset of record `i`'s header in `encode(sample())`.
    fn record_at(bytes: &[u8], i: usize) -> usize {
        let mut at = 8;
        for _ in 0..i {
            let name_len = usize::from(bytes[at]);
            let len_at = at + 1 + name_len + 8;
            let len = u32::from_le_bytes(bytes[len_at..len_at + 4].try_into().unwrap());
            at = len_at + 4 + 8 + len as usize;
        }
        at
    }

    #[test]
    fn sections_round_trip() {
        let s = sample();
        assert_eq!(decode(&encode(&s), SPECS), Ok(s));
        assert_eq!(decode(&encode(&[]), SPECS), Ok(vec![]));
    }

    #[test]
    fn a_foreign_or_empty_stream_is_refused() {
        assert_eq!(decode(b"", SPECS), Err(SectionError::BadMagic(0)));
        assert_eq!(
            decode(b"{\"version\":2}", SPECS),
            Err(SectionError::BadMagic(u32::from_le_bytes(*b"{\"ve")))
        );
    }

    #[test]
    fn too_many_records_are_refused_before_reading_them() {
        let mut b = encode(&[]);
        b[4..8].copy_from_slice(&(MAX_SECTIONS + 1).to_le_bytes());
        assert_eq!(
            decode(&b, SPECS),
            Err(SectionError::TooMany(MAX_SECTIONS + 1))
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = encode(&sample());
        for cut in 5..b.len() {
            let e = decode(&b[..cut], SPECS).unwrap_err();
            assert!(
                matches!(e, SectionError::Truncated { .. }),
                "cut {cut}: {e}"
            );
        }
    }

    #[test]
    fn an_unknown_section_is_refused_by_name() {
        let b = encode(&[section("hpet", 0, 1, b"x")]);
        let e = decode(&b, SPECS).unwrap_err();
        assert_eq!(
            e,
            SectionError::Unknown {
                name: "hpet".into(),
                known: "vcpu, clock".into()
            }
        );
        assert!(e.to_string().contains("unknown device section `hpet`"));
    }

    #[test]
    fn a_newer_version_is_refused() {
        let b = encode(&[section("clock", 0, 2, b"x")]);
        assert_eq!(
            decode(&b, SPECS),
            Err(SectionError::Newer {
                name: "clock".into(),
                version: 2,
                ours: 1
            })
        );
    }

    #[test]
    fn version_zero_is_refused() {
        let b = encode(&[section("clock", 0, 0, b"x")]);
        assert!(matches!(
            decode(&b, SPECS),
            Err(SectionError::VersionZero { .. })
        ));
    }

    #[test]
    fn a_record_over_its_limit_is_refused() {
        let b = encode(&[section("clock", 0, 1, &[0; 17])]);
        assert_eq!(
            decode(&b, SPECS),
            Err(SectionError::TooLarge {
                name: "clock".into(),
                len: 17,
                limit: 16
            })
        );
    }

    #[test]
    fn an_instance_over_its_limit_is_refused() {
        let b = encode(&[section("vcpu", 4, 1, b"x")]);
        assert!(matches!(
            decode(&b, SPECS),
            Err(SectionError::BadInstance { instance: 4, .. })
        ));
    }

    #[test]
    fn a_duplicate_is_refused() {
        let b = encode(&[section("vcpu", 1, 1, b"a"), section("vcpu", 1, 1, b"b")]);
        assert!(matches!(
            decode(&b, SPECS),
            Err(SectionError::Duplicate { instance: 1, .. })
        ));
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_is_caught() {
        let b = encode(&sample());
        let start = record_at(&b, 1);
        let end = record_at(&b, 2);
        for at in start..end {
            let mut bad = b.clone();
            bad[at] ^= 0x01;
            assert!(decode(&bad, SPECS).is_err(), "flip at {at} went through");
        }
        // In the data itself, it is the checksum that catches it.
        let mut bad = b.clone();
        bad[end - 1] ^= 0x80;
        assert_eq!(
            decode(&bad, SPECS),
            Err(SectionError::Checksum {
                name: "vcpu".into(),
                instance: 1
            })
        );
    }

    #[test]
    fn a_bad_name_is_refused() {
        let mut b = encode(&[section("vcpu", 0, 1, b"x")]);
        b[9] = b'V'; // "Vcpu": upper case is not a name
        assert_eq!(decode(&b, SPECS), Err(SectionError::BadName { index: 0 }));
        let mut b = encode(&[section("vcpu", 0, 1, b"x")]);
        b[8] = 0; // empty name
        assert!(decode(&b, SPECS).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut b = encode(&sample());
        b.push(0);
        assert_eq!(decode(&b, SPECS), Err(SectionError::TrailingBytes(1)));
    }
}
