use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many values a [`PerCharge`] holds without a heap allocation.
const INLINE: usize = 2;

/// One value per charge of a reservation, in the order of its charges.
///
/// Reads like a slice (it derefs to `[T]`). Up to two values (a route's one cost, an LLM's
/// input and output tokens) are stored inline, so the ledger's answers on the hot path
/// allocate nothing; more spill to the heap.
///
/// ```
/// use tower_402::ledger::PerCharge;
///
/// let left: PerCharge<Option<u64>> = [Some(3), None].into_iter().collect();
/// assert_eq!(left.len(), 2);
/// assert_eq!(left[0], Some(3));
/// assert_eq!(left, vec![Some(3), None]);
/// ```
#[derive(Clone)]
pub struct PerCharge<T: Copy + Default>(Repr<T>);

#[derive(Clone)]
enum Repr<T> {
    Inline { len: u8, items: [T; INLINE] },
    Heap(Vec<T>),
}

impl<T: Copy + Default> PerCharge<T> {
    /// No values.
    pub fn new() -> Self {
        PerCharge(Repr::Inline {
            len: 0,
            items: [T::default(); INLINE],
        })
    }

    /// Room for `n` values (on the heap only beyond the inline two).
    pub fn with_capacity(n: usize) -> Self {
        if n <= INLINE {
            Self::new()
        } else {
            PerCharge(Repr::Heap(Vec::with_capacity(n)))
        }
    }

    /// Appends a value.
    pub fn push(&mut self, value: T) {
        match &mut self.0 {
            Repr::Inline { len, items } if usize::from(*len) < INLINE => {
                items[usize::from(*len)] = value;
                *len += 1;
            }
            Repr::Inline { len, items } => {
                let mut heap = Vec::with_capacity(INLINE * 2);
                heap.extend_from_slice(&items[..usize::from(*len)]);
                heap.push(value);
                self.0 = Repr::Heap(heap);
            }
            Repr::Heap(v) => v.push(value),
        }
    }

    /// The values as a slice.
    pub fn as_slice(&self) -> &[T] {
        match &self.0 {
            Repr::Inline { len, items } => &items[..usize::from(*len)],
            Repr::Heap(v) => v,
        }
    }
}

impl<T: Copy + Default> Default for PerCharge<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default> Deref for PerCharge<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy + Default> FromIterator<T> for PerCharge<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut out = Self::with_capacity(iter.size_hint().0);
        for v in iter {
            out.push(v);
        }
        out
    }
}

impl<T: Copy + Default> From<Vec<T>> for PerCharge<T> {
    fn from(v: Vec<T>) -> Self {
        if v.len() <= INLINE {
            v.into_iter().collect()
        } else {
            PerCharge(Repr::Heap(v))
        }
    }
}

impl<T: Copy + Default, const N: usize> From<[T; N]> for PerCharge<T> {
    fn from(v: [T; N]) -> Self {
        v.into_iter().collect()
    }
}

impl<'a, T: Copy + Default> IntoIterator for &'a PerCharge<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<T: Copy + Default + PartialEq> PartialEq for PerCharge<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + Eq> Eq for PerCharge<T> {}

impl<T: Copy + Default + PartialEq> PartialEq<Vec<T>> for PerCharge<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + PartialEq> PartialEq<[T]> for PerCharge<T> {
    fn eq(&self, other: &[T]) -> bool {
        self.as_slice() == other
    }
}

impl<T: Copy + Default + fmt::Debug> fmt::Debug for PerCharge<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl<T: Copy + Default + Serialize> Serialize for PerCharge<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de, T: Copy + Default + Deserialize<'de>> Deserialize<'de> for PerCharge<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_then_heap() {
        let mut v = PerCharge::new();
        assert!(v.is_empty());
        for i in 0..5u64 {
            v.push(i);
            assert_eq!(v.as_slice(), (0..=i).collect::<Vec<_>>().as_slice());
        }
        assert_eq!(v, vec![0, 1, 2, 3, 4]);
        assert_eq!(PerCharge::from(vec![7u64]), vec![7]);
        assert_eq!(PerCharge::from(vec![1u64, 2, 3]).len(), 3);
        assert_eq!(PerCharge::<u64>::with_capacity(9), PerCharge::new());
    }

    #[test]
    fn serializes_as_a_list() {
        let v: PerCharge<Option<u64>> = [Some(1), None].into();
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "[1,null]");
        let back: PerCharge<Option<u64>> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
        let many: PerCharge<u64> = serde_json::from_str("[1,2,3]").unwrap();
        assert_eq!(many, vec![1, 2, 3]);
    }
}
