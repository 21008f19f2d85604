//! Shared code for ferry benchmarks.
