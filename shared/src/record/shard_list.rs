//! A step's shard records as chunks shared between copies. The engine copies a step's
//! record whenever it hands it to a writer (the store's whole-step write at planning
//! and at a run's end, the `pipeline_state.json` mirror): with a million shards a
//! `Vec` copy was ~300 MB each time. Here a copy is one pointer per chunk of
//! [`CHUNK`] records, and changing a shard copies only its chunk, and only while a
//! copy still holds it. Serialized as a plain list, as the `Vec` it replaces was.

use super::ShardRecord;
use std::sync::Arc;

/// Records per shared chunk.
pub const CHUNK: usize = 1024;

/// A list of shard records (see the module's doc).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ShardList {
    /// Full chunks of [`CHUNK`], the last one possibly shorter.
    chunks: Vec<Arc<Vec<ShardRecord>>>,
    len: usize,
}

impl ShardList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Record `k`.
    pub fn get(&self, k: usize) -> Option<&ShardRecord> {
        self.chunks.get(k / CHUNK)?.get(k % CHUNK)
    }

    /// Record `k`, to change (its chunk is copied first if a copy of the list holds it).
    pub fn get_mut(&mut self, k: usize) -> Option<&mut ShardRecord> {
        Arc::make_mut(self.chunks.get_mut(k / CHUNK)?).get_mut(k % CHUNK)
    }

    /// Adds a record at the end.
    pub fn push(&mut self, r: ShardRecord) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => Arc::make_mut(c).push(r),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(r);
                self.chunks.push(Arc::new(c));
            }
        }
        self.len += 1;
    }

    /// Removes every record.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The records in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &ShardRecord> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

impl std::ops::Index<usize> for ShardList {
    type Output = ShardRecord;

    fn index(&self, k: usize) -> &ShardRecord {
        match self.get(k) {
            Some(r) => r,
            None => panic!("shard {k} of {}", self.len),
        }
    }
}

impl std::ops::IndexMut<usize> for ShardList {
    fn index_mut(&mut self, k: usize) -> &mut ShardRecord {
        let len = self.len;
        match self.get_mut(k) {
            Some(r) => r,
            None => panic!("shard {k} of {len}"),
        }
    }
}

impl FromIterator<ShardRecord> for ShardList {
    fn from_iter<I: IntoIterator<Item = ShardRecord>>(iter: I) -> Self {
        let mut l = Self::new();
        for r in iter {
            l.push(r);
        }
        l
    }
}

impl From<Vec<ShardRecord>> for ShardList {
    fn from(v: Vec<ShardRecord>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a ShardList {
    type Item = &'a ShardRecord;
    type IntoIter = Box<dyn DoubleEndedIterator<Item = &'a ShardRecord> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl std::fmt::Debug for ShardList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl serde::Serialize for ShardList {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for ShardList {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        Ok(Vec::<ShardRecord>::deserialize(de)?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StepStatus;

    fn shard(index: u32) -> ShardRecord {
        ShardRecord {
            index,
            status: StepStatus::Pending,
            cache_key: None,
            hash: None,
            worker: None,
            attempts: 0,
            error: None,
        }
    }

    #[test]
    fn a_copy_shares_its_chunks_and_a_change_copies_only_the_changed_one() {
        let n = CHUNK * 3 + 5;
        let mut a: ShardList = (0..n as u32).map(shard).collect();
        assert_eq!(a.len(), n);
        let b = a.clone();
        assert!(
            a.chunks
                .iter()
                .zip(&b.chunks)
                .all(|(x, y)| Arc::ptr_eq(x, y)),
            "a copy is pointers to the same chunks"
        );
        a[CHUNK + 7].status = StepStatus::Complete;
        let shared: Vec<bool> = a
            .chunks
            .iter()
            .zip(&b.chunks)
            .map(|(x, y)| Arc::ptr_eq(x, y))
            .collect();
        assert_eq!(shared, vec![true, false, true, true], "only chunk 1 copied");
        assert_eq!(
            b[CHUNK + 7].status,
            StepStatus::Pending,
            "the copy is unchanged"
        );
        assert_eq!(a[CHUNK + 7].status, StepStatus::Complete);
        assert_eq!(
            a.iter().map(|s| s.index as usize).collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
    }

    #[test]
    fn it_is_serialized_as_the_plain_list_it_replaced() {
        let v: Vec<ShardRecord> = (0..(CHUNK as u32 + 2)).map(shard).collect();
        let l = ShardList::from(v.clone());
        let a = serde_json::to_string(&l).expect("json");
        assert_eq!(a, serde_json::to_string(&v).expect("json"));
        let back: ShardList = serde_json::from_str(&a).expect("parse");
        assert_eq!(back, l);
        assert_eq!(back.get(CHUNK + 1).map(|s| s.index), Some(CHUNK as u32 + 1));
        assert!(back.get(CHUNK + 2).is_none());
    }
}
