//! Connector tests (issue 3): fakes of each vendor on loopback.
