//! Shared helpers for end-to-end tests (process guards, skips).
