//! A multiboot v1 loader: puts an image into guest memory and writes the
//! multiboot information the workload guest reads (GUEST.md, "Image and entry").

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Where ferry puts the multiboot information structure.
pub const MBI_ADDR: u64 = 0x9000;
/// Where ferry puts the command-line string.
pub const CMDLINE_ADDR: u64 = 0x9100;
/// Longest command line that fits before the next page.
pub const CMDLINE_MAX: usize = 0xF00 - 1;
/// Where ferry puts the multiboot memory map (one entry per RAM region).
pub const MMAP_ADDR: u64 = 0x8000;
/// Bytes of one multiboot memory map entry (`size` field included).
const MMAP_ENTRY: usize = 24;
/// Multiboot info flags: `mem_*`, `cmdline`, `mmap_*`.
const MBI_FLAGS: u32 = 0x1 | 0x4 | 0x40;

const MB_MAGIC: u32 = 0x1BAD_B002;
const MB_FLAG_ADDRESS_FIELDS: u32 = 1 << 16;
/// The header must lie within the first 8 KiB of the image (multiboot spec).
const MB_SEARCH: usize = 8192;

/// The result of loading: where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point (32-bit protected mode).
    pub entry: u32,
    /// End of the image in memory (bss included).
    pub end: u64,
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// Loads a multiboot v1 image (address fields or ELF32) into `mem`.
pub fn load_multiboot<M: GuestMemoryBackend>(mem: &M, image: &[u8]) -> Result<LoadedImage, String> {
    let mem_end = mem.last_addr().0 + 1;
    let (hdr_off, flags) = (0..MB_SEARCH.min(image.len().saturating_sub(12)))
        .step_by(4)
        .find_map(|off| {
            let magic = le32(image, off)?;
            let flags = le32(image, off + 4)?;
            let sum = le32(image, off + 8)?;
            (magic == MB_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
                .then_some((off, flags))
        })
        .ok_or("no multiboot v1 header in the first 8 KiB")?;
    if flags & 0xFFFC != 0 {
        return Err(format!(
            "multiboot flags {flags:#x} ask for features ferry does not offer (video mode?)"
        ));
    }
    let put = |gpa: u64, bytes: &[u8]| -> Result<(), String> {
        if gpa
            .checked_add(bytes.len() as u64)
            .is_none_or(|e| e > mem_end)
        {
            return Err(format!(
                "image segment at {gpa:#x} (+{:#x}) does not fit in guest memory",
                bytes.len()
            ));
        }
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| format!("writing image at {gpa:#x}: {e}"))
    };
    let zero = |gpa: u64, len: u64| -> Result<(), String> {
        let len = usize::try_from(len).map_err(|_| "bss too large".to_string())?;
        put(gpa, &vec![0u8; len])
    };

    if flags & MB_FLAG_ADDRESS_FIELDS != 0 {
        let f = |i: usize| le32(image, hdr_off + 12 + 4 * i).ok_or("truncated multiboot header");
        let (header_addr, load_addr, load_end, bss_end, entry) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
        if load_addr > header_addr {
            return Err("load_addr is above header_addr".into());
        }
        let file_start = hdr_off
            .checked_sub((header_addr - load_addr) as usize)
            .ok_or("header_addr - load_addr is before the start of the file")?;
        let len = if load_end == 0 {
            image.len() - file_start
        } else {
            load_end
                .checked_sub(load_addr)
                .ok_or("load_end_addr below load_addr")? as usize
        };
        let bytes = image
            .get(file_start..file_start + len)
            .ok_or("image is shorter than its multiboot header says")?;
        put(u64::from(load_addr), bytes)?;
        let end = u64::from(load_addr) + len as u64;
        let mut top = end;
        if bss_end > 0 && u64::from(bss_end) > end {
            zero(end, u64::from(bss_end) - end)?;
            top = u64::from(bss_end);
        }
        return Ok(LoadedImage { entry, end: top });
    }

    // Plain ELF32: load every PT_LOAD segment at its physical address.
    if image.get(0..4) != Some(b"\x7fELF") || image.get(4) != Some(&1) {
        return Err("no address fields in the multiboot header and not an ELF32 file".into());
    }
    let entry = le32(image, 24).ok_or("truncated ELF header")?;
    let phoff = le32(image, 28).ok_or("truncated ELF header")? as usize;
    let phentsize = usize::from(le16(image, 42).ok_or("truncated ELF header")?);
    let phnum = usize::from(le16(image, 44).ok_or("truncated ELF header")?);
    let mut end = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let field = |k: usize| le32(image, ph + 4 * k).ok_or("truncated program header");
        if field(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) =
            (field(1)? as usize, field(3)?, field(4)? as usize, field(5)?);
        let bytes = image
            .get(offset..offset + filesz)
            .ok_or("segment extends past the end of the file")?;
        put(u64::from(paddr), bytes)?;
        if u64::from(memsz) > filesz as u64 {
            zero(
                u64::from(paddr) + filesz as u64,
                u64::from(memsz) - filesz as u64,
            )?;
        }
        end = end.max(u64::from(paddr) + u64::from(memsz));
    }
    if end == 0 {
        return Err("ELF file has no loadable segment".into());
    }
    Ok(LoadedImage { entry, end })
}

/// Writes the multiboot information (`flags = mem | cmdline | mmap`), the
/// memory map and the command line. `regions` are the guest's RAM ranges
/// (guest-physical start, bytes), ascending, the first at 0: `mem_upper`
/// covers the first one (RAM below the hole), the map lists them all as
/// type 1 (RAM), which is how a guest finds RAM above 4 GiB.
pub fn write_multiboot_info<M: GuestMemoryBackend>(
    mem: &M,
    regions: &[(u64, u64)],
    cmdline: &str,
) -> Result<(), String> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(format!(
            "command line is {} bytes, at most {CMDLINE_MAX}",
            cmdline.len()
        ));
    }
    let low = match regions.first() {
        Some(&(0, bytes)) if bytes >= 2 << 20 => bytes,
        _ => return Err("guest RAM must start at 0 with at least 2 MiB".into()),
    };
    let mmap_len = regions.len() * MMAP_ENTRY;
    if mmap_len > usize::try_from(MBI_ADDR - MMAP_ADDR).unwrap_or(0) {
        return Err(format!(
            "{} RAM regions do not fit the memory map",
            regions.len()
        ));
    }
    let mut map = Vec::with_capacity(mmap_len);
    for &(gpa, bytes) in regions {
        map.extend_from_slice(&20u32.to_le_bytes()); // entry size after this field
        map.extend_from_slice(&gpa.to_le_bytes());
        map.extend_from_slice(&bytes.to_le_bytes());
        map.extend_from_slice(&1u32.to_le_bytes()); // type 1: RAM
    }
    mem.write_slice(&map, GuestAddress(MMAP_ADDR))
        .map_err(|e| e.to_string())?;
    let mem_upper_kib = u32::try_from(low / 1024 - 1024).unwrap_or(u32::MAX);
    let mut mbi = [0u8; 52];
    mbi[0..4].copy_from_slice(&MBI_FLAGS.to_le_bytes());
    mbi[4..8].copy_from_slice(&640u32.to_le_bytes());
    mbi[8..12].copy_from_slice(&mem_upper_kib.to_le_bytes());
    mbi[16..20].copy_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
    mbi[44..48].copy_from_slice(&(mmap_len as u32).to_le_bytes());
    mbi[48..52].copy_from_slice(&(MMAP_ADDR as u32).to_le_bytes());
    mem.write_slice(&mbi, GuestAddress(MBI_ADDR))
        .map_err(|e| e.to_string())?;
    let mut s = cmdline.as_bytes().to_vec();
    s.push(0);
    mem.write_slice(&s, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn loads_the_workload_guest() {
        let m = mem();
        let img = load_multiboot(&m, crate::GUEST_ELF).unwrap();
        assert_eq!(img.entry & 0xFFF0_0000, 0x10_0000);
        assert!(
            img.end < 0x1F_0000,
            "GUEST.md: keep the image below 0x1F0000"
        );
        let magic: u32 = m.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(magic, MB_MAGIC);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let m = mem();
        assert!(load_multiboot(&m, b"not a kernel")
            .unwrap_err()
            .contains("no multiboot"));
        let cut = &crate::GUEST_ELF[..crate::GUEST_ELF.len() / 2];
        assert!(load_multiboot(&m, cut).is_err());
    }

    #[test]
    fn rejects_image_bigger_than_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(load_multiboot(&m, crate::GUEST_ELF)
            .unwrap_err()
            .contains("does not fit"));
    }

    #[test]
    fn multiboot_info_layout() {
        let m = mem();
        write_multiboot_info(&m, &[(0, 4 << 20)], "rate=1").unwrap();
        let upper: u32 = m.read_obj(GuestAddress(MBI_ADDR + 8)).unwrap();
        assert_eq!(upper, 3 * 1024);
        let flags: u32 = m.read_obj(GuestAddress(MBI_ADDR)).unwrap();
        assert_eq!(flags & 0x40, 0x40, "the memory map is announced");
        let mut s = [0u8; 7];
        m.read_slice(&mut s, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&s, b"rate=1\0");
        assert!(write_multiboot_info(&m, &[(0, 4 << 20)], &"x".repeat(5000)).is_err());
    }

    #[test]
    fn the_memory_map_lists_ram_on_both_sides_of_the_hole() {
        let m = mem();
        let regions = [(0, 3 << 30), (4 << 30, 3 << 30)];
        write_multiboot_info(&m, &regions, "").unwrap();
        let upper: u32 = m.read_obj(GuestAddress(MBI_ADDR + 8)).unwrap();
        assert_eq!(
            u64::from(upper),
            (3 << 20) - 1024,
            "mem_upper: RAM below the hole"
        );
        let len: u32 = m.read_obj(GuestAddress(MBI_ADDR + 44)).unwrap();
        let addr: u32 = m.read_obj(GuestAddress(MBI_ADDR + 48)).unwrap();
        assert_eq!((len, u64::from(addr)), (48, MMAP_ADDR));
        for (i, &(gpa, bytes)) in regions.iter().enumerate() {
            let e = MMAP_ADDR + 24 * i as u64;
            let size: u32 = m.read_obj(GuestAddress(e)).unwrap();
            let base: u64 = m.read_obj(GuestAddress(e + 4)).unwrap();
            let length: u64 = m.read_obj(GuestAddress(e + 12)).unwrap();
            let kind: u32 = m.read_obj(GuestAddress(e + 20)).unwrap();
            assert_eq!((size, base, length, kind), (20, gpa, bytes, 1));
        }
        assert!(write_multiboot_info(&m, &[(1 << 20, 4 << 20)], "").is_err());
    }
}
