//! The engine's page passes (`ferry_engine::encode::page_hash`) on each
//! vector width the CPU has, as CPU-seconds per GiB of pages (getrusage,
//! this thread's user + system), hot and cold:
//!
//! - hot: the pages come from (and go to) a 512 KiB buffer, cached (L2);
//!   the loop runs over it until 1 GiB has been passed. The arithmetic's
//!   cost.
//! - cold: 1 GiB of pseudo-random pages laid out like guest memory
//!   (bigger than this machine's 260 MiB L3), in the setting the migration
//!   has: `hash` and `hash+zero` read guest memory (the source's raw pages,
//!   hashed in place), `copy+hash` copies guest memory into a reused 1 MiB
//!   batch buffer (the source's other pages), `copy+hash, streaming`
//!   copies a reused 1 MiB buffer into guest memory with non-temporal
//!   stores (the destination). `hash+zero, zero pages` reads a 1 GiB region
//!   of zeros (a guest's free memory).
//!
//! Reports, never asserts; every hash is checked against the crate's.
//!
//! ```text
//! cargo bench -p ferry-benches --bench page_hash
//! FERRY_BENCH_MEM_MIB=1024 FERRY_BENCH_RUNS=5 cargo bench -p ferry-benches --bench page_hash
//! ```

use ferry_benches::cold_region::ColdRegion;
use ferry_engine::encode::page_hash::{
    copy_hashed_with, hash_in_place_with, page_hash_with, store_fence, Simd,
};
use ferry_harness::bench::procfs::this_thread_cpu;

const PAGE: usize = 4096;
const HOT: usize = 512 << 10;
const BATCH: usize = 1 << 20;

/// The calling thread's user + system CPU seconds so far.
fn thread_cpu_s() -> f64 {
    this_thread_cpu().expect("getrusage").total()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Hash,
    HashZero,
    Copy,
    CopyStreaming,
}

impl Pass {
    const ALL: [Pass; 4] = [Pass::Hash, Pass::HashZero, Pass::Copy, Pass::CopyStreaming];

    fn name(self) -> &'static str {
        match self {
            Pass::Hash => "hash",
            Pass::HashZero => "hash+zero",
            Pass::Copy => "copy+hash",
            Pass::CopyStreaming => "copy+hash, streaming",
        }
    }
}

/// One page through `pass` on `simd`: the hash, or `None` where the width
/// has no such pass (the crate's width copies nothing).
///
/// # Safety
/// `src` readable and `dst` writable for PAGE bytes, apart.
unsafe fn one(pass: Pass, simd: Simd, src: *const u8, dst: *mut u8) -> Option<u64> {
    match pass {
        // SAFETY: `src` holds PAGE readable bytes (the caller vouches).
        Pass::Hash => Some(page_hash_with(simd, unsafe {
            std::slice::from_raw_parts(src, PAGE)
        })),
        // SAFETY: as above.
        Pass::HashZero => unsafe { hash_in_place_with(simd, src) }.map(|(h, _)| h),
        // SAFETY: `src` and `dst` as the caller vouches.
        Pass::Copy => unsafe { copy_hashed_with(simd, src, dst, false) },
        // SAFETY: as above.
        Pass::CopyStreaming => unsafe { copy_hashed_with(simd, src, dst, true) },
    }
}

/// CPU-seconds per GiB and the (wrapping) sum of the hashes of `pages` pages passed:
/// page `i` read from `src` at `(i * PAGE) % src.len()` and written to
/// `dst` at `(i * PAGE) % dst.len()`. `None` when the width has no such
/// pass.
fn run(pass: Pass, simd: Simd, src: &[u8], dst: &mut [u8], pages: usize) -> Option<(f64, u64)> {
    let mut sum = 0u64;
    let dst_len = dst.len();
    let t0 = thread_cpu_s();
    for i in 0..pages {
        let from = src[(i * PAGE) % src.len()..].as_ptr();
        let to = dst[(i * PAGE) % dst_len..].as_mut_ptr();
        // SAFETY: both offsets are page multiples below lengths that are
        // page multiples: PAGE bytes each, in separate regions.
        sum = sum.wrapping_add(unsafe { one(pass, simd, from, to) }?);
        if i % (BATCH / PAGE) == BATCH / PAGE - 1 {
            store_fence();
        }
    }
    store_fence();
    let cpu = thread_cpu_s() - t0;
    Some((cpu / (pages * PAGE) as f64 * (1u64 << 30) as f64, sum))
}

fn main() {
    if !ferry_benches::started_by_cargo_bench("page_hash") {
        return;
    }
    let env = ferry_benches::env_usize;
    let mib = env("FERRY_BENCH_MEM_MIB", 1024);
    let runs = env("FERRY_BENCH_RUNS", 5);
    let pages = (mib << 20) / PAGE;
    let guest = ColdRegion::new(mib << 20, true);
    let mut zeros = ColdRegion::new(mib << 20, false);
    zeros.bytes_mut().fill(0);
    let mut landing = ColdRegion::new(mib << 20, false);
    let mut hot_src = ColdRegion::new(HOT, true);
    hot_src.bytes_mut().copy_from_slice(&guest.bytes()[..HOT]);
    let mut hot_dst = ColdRegion::new(BATCH, false);
    let fold = |bytes: &[u8]| {
        bytes
            .chunks(PAGE)
            .fold(0u64, |s, p| s.wrapping_add(xxhash_rust::xxh3::xxh3_64(p)))
    };
    let want_guest = fold(guest.bytes());
    let want_zeros = fold(zeros.bytes());
    // Whole rounds over the hot buffer (1 GiB is a multiple of it).
    let want_hot = fold(hot_src.bytes()).wrapping_mul((pages / (HOT / PAGE)) as u64);
    let widths: Vec<Simd> = Simd::ALL.into_iter().filter(|s| s.available()).collect();
    println!(
        "{mib} MiB per run, {runs} runs, alternating; CPU-seconds per GiB (this thread's user + sys), medians; the machine may be shared"
    );
    println!(
        "| pass | setting | {} |",
        widths
            .iter()
            .map(|w| format!("{w:?}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(widths.len()));
    let mut rows: Vec<(Pass, &str)> = Vec::new();
    for pass in Pass::ALL {
        rows.push((pass, "hot"));
        rows.push((pass, "cold"));
    }
    rows.push((Pass::HashZero, "cold, zero pages"));
    let mut cells: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); widths.len()]; rows.len()];
    for _ in 0..runs {
        for (r, &(pass, setting)) in rows.iter().enumerate() {
            for (w, &simd) in widths.iter().enumerate() {
                let (src, dst, want): (&[u8], &mut [u8], u64) = match (pass, setting) {
                    (_, "hot") => (hot_src.bytes(), hot_dst.bytes_mut(), want_hot),
                    (Pass::CopyStreaming, _) => {
                        // A hot buffer into cold guest memory.
                        (hot_src.bytes(), landing.bytes_mut(), want_hot)
                    }
                    (_, "cold") => (guest.bytes(), hot_dst.bytes_mut(), want_guest),
                    _ => (zeros.bytes(), hot_dst.bytes_mut(), want_zeros),
                };
                let Some((per_gib, sum)) = run(pass, simd, src, dst, pages) else {
                    continue;
                };
                if sum != want {
                    eprintln!(
                        "{} {setting} {simd:?}: hashes differ from the crate's",
                        pass.name()
                    );
                }
                cells[r][w].push(per_gib);
            }
        }
    }
    for (r, &(pass, setting)) in rows.iter().enumerate() {
        let line: Vec<String> = cells[r]
            .iter()
            .map(|v| {
                if v.is_empty() {
                    "-".into()
                } else {
                    format!("{:.3}", ferry_benches::median(v.clone()))
                }
            })
            .collect();
        println!("| {} | {setting} | {} |", pass.name(), line.join(" | "));
    }
}
