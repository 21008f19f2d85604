//! xxh3-64 of one page, bit for bit what `xxhash_rust::xxh3::xxh3_64`
//! returns, with its inner loop in AVX-512 or AVX2 when the CPU has them.
//!
//! Why: every page sent is hashed once on each side (skip-unchanged, the
//! per-page check on the destination, the memory digest), and the hash
//! crate picks its SIMD width when it is compiled: for the default x86_64
//! target that is SSE2, whatever the CPU. Profiled on a 1 GiB migration,
//! the SSE2 loop was 17 % of the engine's CPU time; this module picks AVX2
//! when the CPU has it ([`Simd::best`], decided at run time; about 1.6x
//! the SSE2 loop's speed, measured here), else the crate. An AVX-512 loop
//! (one 512-bit register holds all eight accumulators) is here too, tested
//! like the others and measured by `benches/benches/page_hash.rs`, but the
//! data path does not pick it: cold, where migrations read, the passes are
//! memory-bound (it saved 3-8 % of a pass's CPU), and end to end it saved
//! nothing (1 GiB idle and heavy rows, 10 alternating quiet runs each:
//! source + destination engine CPU 0.635 vs 0.615 s idle, 0.68 vs 0.68 s
//! heavy, AVX-512 vs AVX2), while 512-bit code can lower the core's clock
//! for whatever else runs on it. Only the
//! 4 KiB page case is written out (the hash of a page is all the data path
//! computes); any other length goes to the crate.
//!
//! The algorithm (XXH3's long-input path, default secret, seed 0) for a
//! 4096-byte input: eight 64-bit accumulators take 64-byte stripes, each
//! mixed with the secret at 8 bytes further per stripe; after every
//! 16 stripes (a 1 KiB block) they are scrambled with the secret's last
//! 64 bytes. 4096 bytes make 3 full blocks, 15 more stripes and the last
//! stripe (at secret offset 121); the accumulators are then folded into
//! one value and avalanched.

use super::{Page, PAGE_SIZE};

/// XXH3's default secret (`kSecret` in the reference implementation).
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// The accumulators' starting values.
const INITIAL_ACC: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

const STRIPE: usize = 64;
/// Stripes per block: (secret length - stripe) / 8.
const BLOCK_STRIPES: usize = (SECRET.len() - STRIPE) / 8;
const BLOCK: usize = BLOCK_STRIPES * STRIPE;
/// Full blocks in a page ((len - 1) / block, as the reference computes it).
const FULL_BLOCKS: usize = (PAGE_SIZE - 1) / BLOCK;
/// Stripes after the full blocks, before the last stripe.
const TAIL_STRIPES: usize = (PAGE_SIZE - 1 - FULL_BLOCKS * BLOCK) / STRIPE;
/// Where the scramble key starts in the secret.
const SCRAMBLE_KEY: usize = SECRET.len() - STRIPE;
/// Where the last stripe's key starts in the secret.
const LAST_STRIPE_KEY: usize = SECRET.len() - STRIPE - 7;
/// Where the merge keys start in the secret.
const MERGE_KEY: usize = 11;

const _: () = assert!(FULL_BLOCKS == 3 && TAIL_STRIPES == 15 && BLOCK == 1024);

/// The vector instructions a page pass runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// 512-bit vectors (AVX-512F): one register per 64-byte stripe.
    Avx512,
    /// 256-bit vectors (AVX2): two registers per stripe.
    Avx2,
    /// No page pass of this module: the hash crate's loop, and the callers
    /// of [`copy_hashed`] and [`hash_in_place`] copy instead.
    Scalar,
}

impl Simd {
    /// Every width, widest first.
    pub const ALL: [Simd; 3] = [Simd::Avx512, Simd::Avx2, Simd::Scalar];

    /// What the data path uses: AVX2 when this CPU has it (AVX-512 gained
    /// nothing end to end, see the module's page), else the crate.
    pub fn best() -> Simd {
        [Simd::Avx2, Simd::Scalar]
            .into_iter()
            .find(|s| s.available())
            .unwrap_or(Simd::Scalar)
    }

    /// Whether this CPU runs this width.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Simd::Avx512 | Simd::Avx2 => false,
            Simd::Scalar => true,
        }
    }

    /// `self` when the CPU has it, else [`Simd::Scalar`].
    fn checked(self) -> Simd {
        if self.available() {
            self
        } else {
            Simd::Scalar
        }
    }
}

/// xxh3-64 of `data` (equal to `xxhash_rust::xxh3::xxh3_64(data)`); fast
/// for a whole page.
pub fn page_hash(data: &[u8]) -> u64 {
    page_hash_with(Simd::best(), data)
}

/// [`page_hash`] on the given width ([`Simd::Scalar`] when the CPU lacks
/// it): for benches and tests that compare the widths.
pub fn page_hash_with(simd: Simd, data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if let Ok(page) = <&Page>::try_from(data) {
        let src = page.as_ptr();
        let none = std::ptr::null_mut();
        match simd.checked() {
            // SAFETY: the CPU has AVX-512F (checked); `src` holds PAGE_SIZE
            // readable bytes; nothing is written.
            Simd::Avx512 => return unsafe { x86::pass512::<{ x86::HASH_ONLY }>(src, none).0 },
            // SAFETY: the CPU has AVX2 (checked); as above.
            Simd::Avx2 => return unsafe { x86::pass::<{ x86::HASH_ONLY }>(src, none).0 },
            Simd::Scalar => {}
        }
    }
    let _ = simd;
    xxhash_rust::xxh3::xxh3_64(data)
}

fn secret_u64(offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&SECRET[offset..offset + 8]);
    u64::from_le_bytes(b)
}

fn mul128_fold64(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Fold the accumulators of a page's hash into the hash.
fn merge(acc: &[u64; 8]) -> u64 {
    let mut result = (PAGE_SIZE as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let key = MERGE_KEY + 16 * i;
        result = result.wrapping_add(mul128_fold64(
            acc[2 * i] ^ secret_u64(key),
            acc[2 * i + 1] ^ secret_u64(key + 8),
        ));
    }
    result ^= result >> 37;
    result = result.wrapping_mul(0x1656_6791_9E37_79F9);
    result ^ (result >> 32)
}

/// Copy the page at `src` to `dst` and return the xxh3-64 of the bytes
/// copied, reading them once (the hash is computed from the registers the
/// copy goes through), when the CPU has AVX-512F or AVX2; `None` when it
/// has neither (the caller then copies and hashes in two passes, as before).
///
/// One pass instead of two: on the source the page comes from guest
/// memory (a cold read the copy pays anyway, which hides the hash's
/// arithmetic); on the destination the decoded page goes into guest
/// memory, and the hash no longer reads the buffer a second time.
/// With plain stores (the source), the next page in memory is prefetched
/// while this one is copied: the hardware prefetcher stops at every 4 KiB
/// boundary, and reading cold guest memory page by page went from 5.8 to
/// 9.8 GB/s per core here with it (round 0 and most chunks read runs of
/// neighbouring pages).
/// Because the hash is of the bytes that were stored, a page the guest
/// changes meanwhile still goes out with the hash of exactly what was sent.
/// `streaming`: non-temporal stores, for a destination nobody reads soon
/// (guest memory on the destination; see `destination::workers`). They are
/// weakly ordered: call [`store_fence`] before anything depends on them
/// (once per batch, not per page: a fence per page made each page wait for
/// the one before to reach memory). A `dst` not aligned to the vector
/// width (64 bytes for AVX-512, 32 for AVX2) gets plain stores.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of [`PAGE_SIZE`]
/// bytes, and the two must not overlap.
pub unsafe fn copy_hashed(src: *const u8, dst: *mut u8, streaming: bool) -> Option<u64> {
    // SAFETY: the caller vouches for `src` and `dst`.
    unsafe { copy_hashed_with(Simd::best(), src, dst, streaming) }
}

/// [`copy_hashed`] on the given width (`None` for [`Simd::Scalar`] or a
/// width the CPU lacks): for benches and tests that compare the widths.
///
/// # Safety
/// As [`copy_hashed`].
pub unsafe fn copy_hashed_with(
    simd: Simd,
    src: *const u8,
    dst: *mut u8,
    streaming: bool,
) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{pass, pass512, CACHED, STREAMING};
        let hashed = match simd.checked() {
            Simd::Avx512 if streaming && (dst as usize).is_multiple_of(64) => {
                // SAFETY: the CPU has AVX-512F (checked); the caller vouches
                // for `src` and `dst`; `dst` is 64-byte aligned (checked).
                unsafe { pass512::<STREAMING>(src, dst) }
            }
            // SAFETY: the CPU has AVX-512F; the caller vouches for `src`
            // and `dst`.
            Simd::Avx512 => unsafe { pass512::<CACHED>(src, dst) },
            Simd::Avx2 if streaming && (dst as usize).is_multiple_of(32) => {
                // SAFETY: the CPU has AVX2 (checked); the caller vouches for
                // `src` and `dst`; `dst` is 32-byte aligned (checked).
                unsafe { pass::<STREAMING>(src, dst) }
            }
            // SAFETY: the CPU has AVX2; the caller vouches for `src` and `dst`.
            Simd::Avx2 => unsafe { pass::<CACHED>(src, dst) },
            Simd::Scalar => return None,
        };
        Some(hashed.0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (simd, src, dst, streaming);
        None
    }
}

/// Hash the page at `src` in one read-only pass and say whether every
/// byte read was zero, when the CPU has AVX-512F or AVX2 (`None` when not:
/// the caller then copies). For a raw page that goes into the socket
/// straight from guest memory: the hash and the zero test come from the
/// same loads, so a page seen as zero hashes as the zero page even if the
/// guest writes it meanwhile (what the kernel then copies may differ: a
/// torn page, see [`crate::protocol::TornPage`]). The next page is
/// prefetched as in [`copy_hashed`].
///
/// # Safety
/// `src` must be valid for reads of [`PAGE_SIZE`] bytes.
pub unsafe fn hash_in_place(src: *const u8) -> Option<(u64, bool)> {
    // SAFETY: the caller vouches for `src`.
    unsafe { hash_in_place_with(Simd::best(), src) }
}

/// [`hash_in_place`] on the given width (`None` for [`Simd::Scalar`] or a
/// width the CPU lacks): for benches and tests that compare the widths.
///
/// # Safety
/// As [`hash_in_place`].
pub unsafe fn hash_in_place_with(simd: Simd, src: *const u8) -> Option<(u64, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{pass, pass512, ZERO_TEST};
        let none = std::ptr::null_mut();
        match simd.checked() {
            // SAFETY: the CPU has AVX-512F (checked); the caller vouches for
            // `src`; nothing is written.
            Simd::Avx512 => Some(unsafe { pass512::<ZERO_TEST>(src, none) }),
            // SAFETY: the CPU has AVX2 (checked); as above.
            Simd::Avx2 => Some(unsafe { pass::<ZERO_TEST>(src, none) }),
            Simd::Scalar => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (simd, src);
        None
    }
}

/// Order the streaming stores of [`copy_hashed`] made so far before any
/// later store (an `sfence`; nothing where there are none).
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a fence has no memory operands; SSE2 is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // `loadu`/`storeu` take any alignment (and `stream` is only used on
    // 32-byte aligned addresses): the casts to a vector pointer only name
    // the type.
    #![allow(clippy::cast_ptr_alignment)]

    use std::arch::x86_64::{
        __m256i, __m512i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_or_si256,
        _mm256_set1_epi32, _mm256_setzero_si256, _mm256_shuffle_epi32, _mm256_slli_epi64,
        _mm256_srli_epi64, _mm256_storeu_si256, _mm256_stream_si256, _mm256_testz_si256,
        _mm256_xor_si256, _mm512_add_epi64, _mm512_loadu_si512, _mm512_mul_epu32, _mm512_or_si512,
        _mm512_set1_epi32, _mm512_setzero_si512, _mm512_shuffle_epi32, _mm512_slli_epi64,
        _mm512_srli_epi64, _mm512_storeu_si512, _mm512_stream_si512, _mm512_ternarylogic_epi64,
        _mm512_test_epi64_mask, _mm512_xor_si512, _mm_prefetch, _MM_HINT_T1,
    };

    use super::{
        merge, BLOCK_STRIPES, FULL_BLOCKS, INITIAL_ACC, LAST_STRIPE_KEY, PAGE_SIZE, PRIME32_1,
        SCRAMBLE_KEY, SECRET, STRIPE,
    };

    /// [`pass`] only hashes.
    pub(super) const HASH_ONLY: u8 = 0;
    /// [`pass`] also copies, with plain stores.
    pub(super) const CACHED: u8 = 1;
    /// [`pass`] also copies, with non-temporal stores.
    pub(super) const STREAMING: u8 = 2;
    /// [`pass`] only reads (prefetching the next page) and tests for zeros.
    pub(super) const ZERO_TEST: u8 = 3;

    /// The secret's key for stripe `s` of a page (the last stripe has its
    /// own).
    const fn key_at(s: usize) -> usize {
        if s == PAGE_SIZE / STRIPE - 1 {
            LAST_STRIPE_KEY
        } else {
            (s % BLOCK_STRIPES) * 8
        }
    }

    /// Whether the accumulators are scrambled after stripe `s`.
    const fn scrambles_after(s: usize) -> bool {
        s % BLOCK_STRIPES == BLOCK_STRIPES - 1 && s < FULL_BLOCKS * BLOCK_STRIPES
    }

    /// Whether a pass with this sink prefetches the next page: the next
    /// page's line at the same offset, into L2 ahead of its own pass (the
    /// hardware prefetcher stops at 4 KiB boundaries; a prefetch never
    /// faults, so an address past the memory is harmless). Into L2
    /// (`prefetcht1`), not L1: over 1 GiB of cold guest memory
    /// (`benches/benches/page_hash.rs`) that took the hash + zero pass
    /// from 0.116-0.118 to 0.104 CPU-s/GiB and the copy + hash one from
    /// 0.125-0.127 to 0.116-0.120; two pages ahead instead of one changed
    /// nothing, `prefetchnta` was slower (0.139), none at all 0.152. Not
    /// for [`STREAMING`] (its source is a buffer the decoder just filled)
    /// nor [`HASH_ONLY`].
    const fn prefetches(sink: u8) -> bool {
        sink == CACHED || sink == ZERO_TEST
    }

    /// One pass over the page at `src`: its xxh3-64, two registers of four
    /// accumulators each, and (per `SINK`) the bytes stored to `dst` as
    /// they are read, or (for [`ZERO_TEST`]) whether they were all zero
    /// (`false` for the other sinks). Every 64-byte stripe of a 4 KiB page is taken exactly
    /// once and in order (3 blocks of 16 stripes, each followed by a
    /// scramble, 15 stripes, then the last one with its own key), which is
    /// what lets the copy ride along.
    ///
    /// # Safety
    /// The CPU must have AVX2; `src` must be valid for reads of PAGE_SIZE
    /// bytes; unless `SINK` is [`HASH_ONLY`], `dst` must be valid for writes
    /// of PAGE_SIZE bytes, not overlap `src`, and for [`STREAMING`] be
    /// 32-byte aligned.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pass<const SINK: u8>(src: *const u8, dst: *mut u8) -> (u64, bool) {
        let mut seen = _mm256_setzero_si256();
        let mut acc = [
            load(&INITIAL_ACC_BYTES[..32]),
            load(&INITIAL_ACC_BYTES[32..]),
        ];
        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
        let stripes = PAGE_SIZE / STRIPE;
        for s in 0..stripes {
            let key_at = key_at(s);
            if prefetches(SINK) {
                let ahead = src.wrapping_add(PAGE_SIZE + s * STRIPE);
                _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
            }
            for (half, a) in acc.iter_mut().enumerate() {
                let at = s * STRIPE + 32 * half;
                // SAFETY: `at + 32 <= PAGE_SIZE`, and `src` is valid for
                // PAGE_SIZE reads (the caller vouches); any alignment.
                let data = unsafe { _mm256_loadu_si256(src.wrapping_add(at).cast()) };
                if SINK == CACHED {
                    // SAFETY: `at + 32 <= PAGE_SIZE`, and `dst` is valid for
                    // PAGE_SIZE writes (the caller vouches); any alignment.
                    unsafe { _mm256_storeu_si256(dst.wrapping_add(at).cast(), data) };
                } else if SINK == STREAMING {
                    // SAFETY: as above, and `dst` (so `dst + at`, a multiple
                    // of 32 further) is 32-byte aligned (the caller vouches).
                    unsafe { _mm256_stream_si256(dst.wrapping_add(at).cast(), data) };
                } else if SINK == ZERO_TEST {
                    seen = _mm256_or_si256(seen, data);
                }
                let key = load(&SECRET[key_at + 32 * half..key_at + 32 * (half + 1)]);
                let data_key = _mm256_xor_si256(data, key);
                let product = _mm256_mul_epu32(data_key, _mm256_srli_epi64::<32>(data_key));
                let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(data);
                *a = _mm256_add_epi64(*a, _mm256_add_epi64(product, swapped));
            }
            if scrambles_after(s) {
                for (half, a) in acc.iter_mut().enumerate() {
                    let at = SCRAMBLE_KEY + 32 * half;
                    let key = load(&SECRET[at..at + 32]);
                    let mixed =
                        _mm256_xor_si256(_mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a)), key);
                    let lo = _mm256_mul_epu32(mixed, prime);
                    let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(mixed), prime);
                    *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
                }
            }
        }
        let mut out = [0u8; 64];
        for (half, a) in acc.iter().enumerate() {
            store(&mut out[32 * half..32 * (half + 1)], *a);
        }
        let mut words = [0u64; 8];
        for (w, b) in words.iter_mut().zip(out.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().expect("8-byte chunk"));
        }
        let zero = SINK == ZERO_TEST && _mm256_testz_si256(seen, seen) == 1;
        (merge(&words), zero)
    }

    /// [`pass`] with 512-bit vectors: one register holds the eight
    /// accumulators and one load takes a stripe.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `src` must be valid for reads of
    /// PAGE_SIZE bytes; unless `SINK` is [`HASH_ONLY`] or [`ZERO_TEST`],
    /// `dst` must be valid for writes of PAGE_SIZE bytes, not overlap `src`,
    /// and for [`STREAMING`] be 64-byte aligned.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pass512<const SINK: u8>(src: *const u8, dst: *mut u8) -> (u64, bool) {
        let mut seen = _mm512_setzero_si512();
        let mut acc = load512(&INITIAL_ACC_BYTES);
        let prime = _mm512_set1_epi32(PRIME32_1 as i32);
        let scramble_key = load512(&SECRET[SCRAMBLE_KEY..SCRAMBLE_KEY + STRIPE]);
        for s in 0..PAGE_SIZE / STRIPE {
            let at = s * STRIPE;
            if prefetches(SINK) {
                _mm_prefetch::<_MM_HINT_T1>(src.wrapping_add(PAGE_SIZE + at).cast());
            }
            // SAFETY: `at + 64 <= PAGE_SIZE`, and `src` is valid for
            // PAGE_SIZE reads (the caller vouches); any alignment.
            let data = unsafe { _mm512_loadu_si512(src.wrapping_add(at).cast()) };
            if SINK == CACHED {
                // SAFETY: `at + 64 <= PAGE_SIZE`, and `dst` is valid for
                // PAGE_SIZE writes (the caller vouches); any alignment.
                unsafe { _mm512_storeu_si512(dst.wrapping_add(at).cast(), data) };
            } else if SINK == STREAMING {
                // SAFETY: as above, and `dst` (so `dst + at`, a multiple of
                // 64 further) is 64-byte aligned (the caller vouches).
                unsafe { _mm512_stream_si512(dst.wrapping_add(at).cast(), data) };
            } else if SINK == ZERO_TEST {
                seen = _mm512_or_si512(seen, data);
            }
            let key_at = key_at(s);
            let key = load512(&SECRET[key_at..key_at + STRIPE]);
            let data_key = _mm512_xor_si512(data, key);
            let product = _mm512_mul_epu32(data_key, _mm512_srli_epi64::<32>(data_key));
            let swapped = _mm512_shuffle_epi32::<0b01_00_11_10>(data);
            acc = _mm512_add_epi64(acc, _mm512_add_epi64(product, swapped));
            if scrambles_after(s) {
                // acc ^ (acc >> 47) ^ key in one instruction (0x96: a ^ b ^ c).
                let mixed = _mm512_ternarylogic_epi64::<0x96>(
                    acc,
                    _mm512_srli_epi64::<47>(acc),
                    scramble_key,
                );
                let lo = _mm512_mul_epu32(mixed, prime);
                let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(mixed), prime);
                acc = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
            }
        }
        let mut out = [0u8; 64];
        // SAFETY: `out` holds 64 writable bytes; the store takes any
        // alignment.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), acc) };
        let mut words = [0u64; 8];
        for (w, b) in words.iter_mut().zip(out.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().expect("8-byte chunk"));
        }
        let zero = SINK == ZERO_TEST && _mm512_test_epi64_mask(seen, seen) == 0;
        (merge(&words), zero)
    }

    /// The 64 bytes of `bytes` (exactly 64 long) as a vector.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load512(bytes: &[u8]) -> __m512i {
        assert_eq!(bytes.len(), 64);
        // SAFETY: `bytes` holds 64 readable bytes (asserted); the load
        // takes any alignment.
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    /// The accumulators' starting values as bytes (little-endian lanes).
    const INITIAL_ACC_BYTES: [u8; 64] = {
        let mut b = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            b[i] = INITIAL_ACC[i / 8].to_le_bytes()[i % 8];
            i += 1;
        }
        b
    };

    /// The 32 bytes of `bytes` (exactly 32 long) as a vector.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn load(bytes: &[u8]) -> __m256i {
        assert_eq!(bytes.len(), 32);
        // SAFETY: `bytes` holds 32 readable bytes (asserted); the load
        // takes any alignment.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    /// `v` into `bytes` (exactly 32 long).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn store(bytes: &mut [u8], v: __m256i) {
        assert_eq!(bytes.len(), 32);
        // SAFETY: `bytes` holds 32 writable bytes (asserted); the store
        // takes any alignment.
        unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(data: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(data)
    }

    /// The widths this CPU runs, each named once in the test output; the
    /// ones it lacks say so (they fall back to the crate, which the tests
    /// would then only compare with itself).
    fn widths() -> Vec<Simd> {
        Simd::ALL
            .into_iter()
            .filter(|s| {
                let there = s.available();
                if !there {
                    eprintln!("SKIP {s:?} page passes (this CPU lacks them)");
                }
                there
            })
            .collect()
    }

    #[test]
    fn the_data_path_runs_on_avx2_when_the_cpu_has_it() {
        let best = Simd::best();
        assert!(best.available());
        assert_ne!(best, Simd::Avx512);
        assert_eq!(best == Simd::Avx2, Simd::Avx2.available(), "{best:?}");
        eprintln!("page passes run on {best:?}");
    }

    #[test]
    fn zero_and_patterned_pages_hash_as_the_crate_does() {
        for simd in widths() {
            let mut page = [0u8; PAGE_SIZE];
            assert_eq!(page_hash_with(simd, &page), reference(&page), "{simd:?}");
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            assert_eq!(page_hash_with(simd, &page), reference(&page), "{simd:?}");
            assert_eq!(
                page_hash_with(simd, &page[..100]),
                reference(&page[..100]),
                "{simd:?}"
            );
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
            }
            assert_eq!(page_hash_with(simd, &page), reference(&page), "{simd:?}");
        }
    }

    #[test]
    fn a_copy_with_its_hash_is_exact_and_hashes_as_the_crate_does() {
        let mut src = [0u8; PAGE_SIZE];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut dst = vec![0u8; 2 * PAGE_SIZE + 128];
        let aligned = dst.as_ptr().align_offset(64);
        // Aligned for both widths, for AVX2's streaming stores only, and
        // not at all (plain stores).
        let offsets = [
            (aligned, true),
            (aligned, false),
            (aligned + 32, true),
            (aligned + 1, true),
        ];
        for simd in widths() {
            for (offset, streaming) in offsets {
                dst.fill(0);
                let at = dst[offset..].as_mut_ptr();
                // SAFETY: `offset + PAGE_SIZE < dst.len()`: `at` has
                // PAGE_SIZE writable bytes after it, apart from `src`.
                let hash = unsafe { copy_hashed_with(simd, src.as_ptr(), at, streaming) };
                store_fence();
                let Some(hash) = hash else {
                    assert_eq!(simd, Simd::Scalar, "only the crate's width copies nothing");
                    continue;
                };
                assert_eq!(hash, reference(&src), "{simd:?} offset {offset}");
                assert_eq!(&dst[offset..offset + PAGE_SIZE], &src[..], "{simd:?}");
                assert!(dst[..offset].iter().all(|&b| b == 0), "{simd:?}");
                assert!(
                    dst[offset + PAGE_SIZE..].iter().all(|&b| b == 0),
                    "{simd:?}"
                );
            }
        }
    }

    #[test]
    fn a_hash_in_place_tells_zero_pages_apart() {
        let mut page = vec![0u8; PAGE_SIZE];
        for simd in widths() {
            for spot in [None, Some(0), Some(PAGE_SIZE / 2 + 3), Some(PAGE_SIZE - 1)] {
                page.fill(0);
                if let Some(at) = spot {
                    page[at] = 0x40;
                }
                // SAFETY: `page` holds PAGE_SIZE readable bytes.
                match unsafe { hash_in_place_with(simd, page.as_ptr()) } {
                    Some((hash, zero)) => {
                        assert_eq!(hash, reference(&page), "{simd:?} {spot:?}");
                        assert_eq!(zero, spot.is_none(), "{simd:?} {spot:?}");
                    }
                    None => assert_eq!(simd, Simd::Scalar, "only the crate's width"),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_page_hashes_as_the_crate_does(
            fill in any::<u8>(),
            spots in proptest::collection::vec((0..PAGE_SIZE, any::<u8>()), 0..64),
        ) {
            let mut page = [fill; PAGE_SIZE];
            for (at, v) in spots {
                page[at] = v;
            }
            let want = reference(&page);
            let zero = page.iter().all(|&b| b == 0);
            prop_assert_eq!(page_hash(&page), want);
            for simd in Simd::ALL.into_iter().filter(|s| s.available()) {
                prop_assert_eq!(page_hash_with(simd, &page), want, "{:?}", simd);
                // SAFETY: `page` holds PAGE_SIZE readable bytes.
                if let Some(got) = unsafe { hash_in_place_with(simd, page.as_ptr()) } {
                    prop_assert_eq!(got, (want, zero), "{:?}", simd);
                }
                for streaming in [false, true] {
                    let mut copy = Box::new(AlignedPage([0u8; PAGE_SIZE]));
                    let to = copy.0.as_mut_ptr();
                    // SAFETY: both are separate PAGE_SIZE-byte arrays.
                    let got = unsafe { copy_hashed_with(simd, page.as_ptr(), to, streaming) };
                    store_fence();
                    if let Some(hash) = got {
                        prop_assert_eq!(hash, want, "{:?}", simd);
                        prop_assert_eq!(&copy.0[..], &page[..], "{:?}", simd);
                    }
                }
            }
        }
    }

    /// A page aligned as guest memory is (so streaming stores run).
    #[repr(C, align(4096))]
    struct AlignedPage([u8; PAGE_SIZE]);
}
