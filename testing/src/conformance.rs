//! The backend conformance suite. Every backend (fs, S3, wrappers) runs it
//! against a real, freshly created, empty location, through the public
//! backend traits only, so a backend in any crate can be held to it.

use bytes::Bytes;
use marmoset_storage::backend::{Backend, FileKind};
use marmoset_storage::{Error, Result};

fn fail(msg: impl Into<String>) -> Error {
    Error::Corrupt {
        object: "backend conformance".into(),
        pack: None,
        reason: msg.into(),
    }
}

fn check(cond: bool, msg: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(fail(msg))
    }
}

/// Runs every conformance check; returns the first violation.
pub fn run_all(b: &dyn Backend) -> Result<()> {
    write_read_round_trip(b)?;
    ranges(b)?;
    listing(b)?;
    listing_with_times(b)?;
    missing_objects(b)?;
    overwrite_and_delete(b)?;
    large_object(b)?;
    Ok(())
}

fn write_read_round_trip(b: &dyn Backend) -> Result<()> {
    for kind in FileKind::ALL {
        let name = format!("{:0>64}", format!("{kind}1"));
        let data = format!("payload of {kind}").into_bytes();
        b.write(kind, &name, Bytes::from(data.clone()))?;
        check(
            b.read(kind, &name)? == data,
            "read returns what was written",
        )?;
        check(b.size(kind, &name)? == data.len() as u64, "size matches")?;
        b.remove(kind, &name)?;
    }
    Ok(())
}

/// `list_info` agrees with `list`, and where the storage stamps objects
/// the stamp is the write's time (coordination relies on it), within a few
/// minutes of this host's clock.
fn listing_with_times(b: &dyn Backend) -> Result<()> {
    let before = chrono::Utc::now();
    let name = "cd".repeat(32);
    b.write(FileKind::Lock, &name, Bytes::from_static(b"lease"))?;
    let mut plain = b.list(FileKind::Lock)?;
    let mut info: Vec<(String, u64)> = b
        .list_info(FileKind::Lock)?
        .into_iter()
        .map(|o| (o.name, o.size))
        .collect();
    plain.sort();
    info.sort();
    check(plain == info, "list_info lists what list lists")?;
    let stamp = b
        .list_info(FileKind::Lock)?
        .into_iter()
        .find(|o| o.name == name)
        .and_then(|o| o.modified);
    if let Some(t) = stamp {
        let skew = chrono::Duration::minutes(5);
        check(
            t >= before - skew && t <= chrono::Utc::now() + skew,
            "modified time is the time of the write",
        )?;
    }
    b.remove(FileKind::Lock, &name)?;
    Ok(())
}

fn ranges(b: &dyn Backend) -> Result<()> {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let name = "ab".repeat(32);
    b.write(FileKind::Pack, &name, Bytes::from(data.clone()))?;
    check(
        b.read_range(FileKind::Pack, &name, 0, 10)? == data[..10],
        "range at start",
    )?;
    check(
        b.read_range(FileKind::Pack, &name, 5000, 1234)? == data[5000..6234],
        "range in middle",
    )?;
    check(
        b.read_range(FileKind::Pack, &name, 9990, 10)? == data[9990..],
        "range at end",
    )?;
    check(
        b.read_range(FileKind::Pack, &name, 9990, 11).is_err(),
        "range beyond end is an error",
    )?;
    b.remove(FileKind::Pack, &name)?;
    Ok(())
}

fn listing(b: &dyn Backend) -> Result<()> {
    let names: Vec<String> = (0..20u8).map(|i| hex::encode([i; 32])).collect();
    for n in &names {
        b.write(FileKind::Pack, n, Bytes::copy_from_slice(n.as_bytes()))?;
        b.write(FileKind::Snapshot, n, Bytes::from_static(b"s"))?;
    }
    let mut packs: Vec<String> = b
        .list(FileKind::Pack)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    packs.sort();
    check(
        packs == names,
        "list returns every pack name, without folders",
    )?;
    let snaps = b.list(FileKind::Snapshot)?;
    check(
        snaps.len() == 20 && snaps.iter().all(|(_, s)| *s == 1),
        "list reports sizes",
    )?;
    check(
        b.list(FileKind::Index)?.is_empty(),
        "other kinds stay empty",
    )?;
    for n in &names {
        b.remove(FileKind::Pack, n)?;
        b.remove(FileKind::Snapshot, n)?;
    }
    check(
        b.list(FileKind::Pack)?.is_empty(),
        "removed objects are not listed",
    )?;
    Ok(())
}

fn missing_objects(b: &dyn Backend) -> Result<()> {
    let name = "cd".repeat(32);
    check(
        matches!(b.read(FileKind::Index, &name), Err(Error::NotFound { .. })),
        "reading a missing object is NotFound",
    )?;
    check(
        matches!(b.size(FileKind::Index, &name), Err(Error::NotFound { .. })),
        "size of a missing object is NotFound",
    )?;
    b.remove(FileKind::Index, &name)?;
    Ok(())
}

fn overwrite_and_delete(b: &dyn Backend) -> Result<()> {
    let name = "ef".repeat(32);
    b.write(FileKind::Lock, &name, Bytes::from_static(b"first"))?;
    b.write(FileKind::Lock, &name, Bytes::from_static(b"second version"))?;
    check(
        b.read(FileKind::Lock, &name)? == b"second version",
        "overwrite replaces",
    )?;
    b.remove(FileKind::Lock, &name)?;
    check(
        b.read(FileKind::Lock, &name).is_err(),
        "deleted object is gone",
    )?;
    Ok(())
}

fn large_object(b: &dyn Backend) -> Result<()> {
    // Larger than typical multipart thresholds so chunked uploads are covered.
    let data: Vec<u8> = (0..(20usize << 20))
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let name = "12".repeat(32);
    b.write(FileKind::Pack, &name, Bytes::from(data.clone()))?;
    check(
        b.size(FileKind::Pack, &name)? == data.len() as u64,
        "large object size",
    )?;
    let got = b.read(FileKind::Pack, &name)?;
    check(got == data, "large object round trip")?;
    let mid = b.read_range(FileKind::Pack, &name, 15 << 20, 1 << 20)?;
    check(mid == data[15 << 20..16 << 20], "range in large object")?;
    b.remove(FileKind::Pack, &name)?;
    Ok(())
}
