#![deny(missing_docs)]
//! placeholder
