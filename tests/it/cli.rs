//! The command line, end to end, against a temp store.
