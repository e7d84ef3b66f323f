//! Trees: directory listings with full metadata, stored as blobs.
//!
//! A directory's entries are sorted by name bytes and split into parts of at
//! most [`MAX_PART_ENTRIES`] nodes, so a directory with millions of entries
//! never needs to be in memory at once. A file's content is its ordered list
//! of chunk ids; past [`MAX_DIRECT_CHUNKS`] chunks the node lists chunk-list
//! blobs instead (`indirect`), so huge files keep small tree nodes.
//! Encoding: MessagePack maps with the field names below (see FORMAT.md).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::id::Id;

pub const MAX_PART_ENTRIES: usize = 10_000;
pub const MAX_DIRECT_CHUNKS: usize = 4096;
/// Ids per chunk-list blob.
pub const CHUNK_LIST_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Chardev,
    Blockdev,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// File name bytes (any bytes except `/` and NUL; never `.` or `..`).
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Logical size for files, 0 otherwise.
    pub size: u64,
    /// Inode and link count, recorded only for files with several links so
    /// restore can recreate hard links.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inode: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub links: u64,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub link_target: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// Files: chunk ids in order (or chunk-list blob ids when `indirect`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Id>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub indirect: bool,
    /// Directories: ids of the tree parts, in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtree: Vec<Id>,
}

impl Node {
    pub fn new(name: Vec<u8>, kind: NodeKind) -> Self {
        Self {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            inode: 0,
            links: 0,
            link_target: None,
            rdev: 0,
            xattrs: Vec::new(),
            content: Vec::new(),
            indirect: false,
            subtree: Vec::new(),
        }
    }

    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// A name is safe when joining it to a directory cannot escape it.
    pub fn has_safe_name(&self) -> bool {
        !self.name.is_empty()
            && self.name != b"."
            && self.name != b".."
            && !self.name.contains(&b'/')
            && !self.name.contains(&0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn encode(&self) -> Result<Vec<u8>> {
        rmp_serde::to_vec_named(self).map_err(|e| Error::corrupt("tree", e.to_string()))
    }

    pub fn decode(id: &Id, b: &[u8]) -> Result<Self> {
        rmp_serde::from_slice(b).map_err(|e| Error::corrupt(format!("tree {id}"), e.to_string()))
    }
}

pub fn encode_chunk_list(ids: &[Id]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.0).collect()
}

pub fn decode_chunk_list(id: &Id, b: &[u8]) -> Result<Vec<Id>> {
    if !b.len().is_multiple_of(32) {
        return Err(Error::corrupt(
            format!("chunk list {id}"),
            "length is not a multiple of 32",
        ));
    }
    Ok(b.chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            Id(a)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_round_trips_with_binary_names() -> Result<()> {
        let mut n = Node::new(vec![0xff, b'\n', b'x'], NodeKind::File);
        n.content = vec![Id([1; 32])];
        n.xattrs.push(Xattr {
            name: b"user.a".to_vec(),
            value: vec![0, 1],
        });
        let mut l = Node::new(b"l".to_vec(), NodeKind::Symlink);
        l.link_target = Some(b"../t".to_vec());
        let t = Tree { nodes: vec![n, l] };
        let id = Id([0; 32]);
        assert_eq!(Tree::decode(&id, &t.encode()?)?, t);
        assert!(Tree::decode(&id, b"\x93garbage").is_err());
        Ok(())
    }

    #[test]
    fn unsafe_names_are_detected() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            assert!(!Node::new(bad.to_vec(), NodeKind::File).has_safe_name());
        }
        assert!(Node::new(b"..a".to_vec(), NodeKind::File).has_safe_name());
    }
}
