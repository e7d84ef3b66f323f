//! The assembler: file results and directory events, in source order,
//! become tree blobs and file-cache entries.

use super::*;

/// A directory being assembled: finished parts plus the current one.
pub(super) struct DirBuilder {
    pub(super) node: Node,
    pub(super) parts: Vec<Id>,
    pub(super) entries: Vec<Node>,
}

impl DirBuilder {
    pub(super) fn push(&mut self, saver: &Saver, node: Node) -> Result<()> {
        self.entries.push(node);
        if self.entries.len() >= tree::MAX_PART_ENTRIES {
            self.flush_part(saver)?;
        }
        Ok(())
    }

    pub(super) fn flush_part(&mut self, saver: &Saver) -> Result<()> {
        let t = Tree {
            nodes: std::mem::take(&mut self.entries),
        };
        self.parts
            .push(saver.save_blob(BlobType::Tree, &t.encode()?)?);
        Ok(())
    }

    pub(super) fn finish(mut self, saver: &Saver) -> Result<(Node, Vec<Id>)> {
        if !self.entries.is_empty() || self.parts.is_empty() {
            self.flush_part(saver)?;
        }
        self.node.subtree = self.parts.clone();
        Ok((self.node, self.parts))
    }
}

pub(super) fn assemble(
    saver: &Saver,
    ctx: &WalkCtx,
    events: Receiver<Vec<Event>>,
) -> Result<(Vec<Id>, BackupSummary)> {
    let r = assemble_inner(saver, ctx, &events);
    if let Err(e) = &r {
        saver.fail(Error::Aborted(e.to_string()));
    }
    r
}

pub(super) fn assemble_inner(
    saver: &Saver,
    ctx: &WalkCtx,
    events: &Receiver<Vec<Event>>,
) -> Result<(Vec<Id>, BackupSummary)> {
    let mut sum = BackupSummary::default();
    let mut stack = vec![DirBuilder {
        node: Node::new(Vec::new(), NodeKind::Dir),
        parts: Vec::new(),
        entries: Vec::new(),
    }];
    for ev in events.iter().flatten() {
        if saver.aborted() {
            return Err(Error::Aborted("backup aborted".into()));
        }
        match ev {
            Event::Enter(node) => {
                sum.dirs_total += 1;
                stack.push(DirBuilder {
                    node: *node,
                    parts: Vec::new(),
                    entries: Vec::new(),
                });
            }
            Event::Exit => {
                let dir = stack
                    .pop()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?;
                let (node, _) = dir.finish(saver)?;
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?
                    .push(saver, node)?;
            }
            Event::Error(e) => {
                warn!(path = %e.path, error = %e.error, "cannot read, skipped");
                saver.progress.errors.fetch_add(1, Ordering::Relaxed);
                sum.errors.push(e);
            }
            Event::Leaf(mut node, file) => {
                if let Some(file) = file {
                    let (pending, key, meta) = *file;
                    let path =
                        String::from_utf8_lossy(&key[ctx.source_key.len() + 1..]).into_owned();
                    let (content, fresh) = match pending {
                        Pending::Ready(c) => (Ok(c), false),
                        Pending::Waiting(rx) => (
                            rx.recv().unwrap_or_else(|_| Err("backup aborted".into())),
                            true,
                        ),
                    };
                    match content {
                        Ok(c) => {
                            if fresh {
                                if ctx.repo.index().get_file(&key)?.is_some() {
                                    sum.files_changed += 1;
                                } else {
                                    sum.files_new += 1;
                                }
                                sum.bytes_read += c.size;
                                if c.size == meta.len() {
                                    ctx.repo.index().put_file(&key, &cache_entry(&c, &meta))?;
                                }
                            } else {
                                sum.files_unmodified += 1;
                                saver.progress.files_done.fetch_add(1, Ordering::Relaxed);
                            }
                            node.size = c.size;
                            node.content = c.content;
                            node.indirect = c.indirect;
                            sum.files_total += 1;
                            sum.bytes_total += node.size;
                        }
                        Err(msg) => {
                            if saver.aborted() {
                                return Err(Error::Aborted("backup aborted".into()));
                            }
                            warn!(path = %path, error = %msg, "cannot read, skipped");
                            saver.progress.errors.fetch_add(1, Ordering::Relaxed);
                            sum.errors.push(SourceError { path, error: msg });
                            continue;
                        }
                    }
                }
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?
                    .push(saver, *node)?;
            }
        }
    }
    if saver.aborted() {
        return Err(Error::Aborted("backup aborted".into()));
    }
    let root = stack
        .pop()
        .ok_or_else(|| Error::Aborted("unbalanced walk".into()))?;
    if !stack.is_empty() {
        return Err(Error::Aborted("walk ended inside a directory".into()));
    }
    let (_, parts) = root.finish(saver)?;
    Ok((parts, sum))
}

pub(super) fn cache_entry(c: &FileContent, meta: &Metadata) -> FileCacheEntry {
    FileCacheEntry {
        size: c.size,
        mtime_ns: mtime_ns(meta),
        ctime_ns: ctime_ns(meta),
        inode: meta.ino(),
        indirect: c.indirect,
        content: c.content.iter().map(|i| i.0).collect(),
    }
}
