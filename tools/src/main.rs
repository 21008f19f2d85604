//! `ferry`: the command line.
fn main() {}
