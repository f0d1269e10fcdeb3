/// Tracks the publishes on one channel in confirm mode until the broker acks or nacks them.
///
/// The broker numbers publishes 1, 2, 3… per channel. Its `basic.ack`/`basic.nack` carry a
/// delivery tag and a `multiple` flag (everything outstanding up to the tag), and may arrive out
/// of order. Slots are kept in a window indexed by sequence number, so registering and resolving
/// are O(1) amortised even with many thousands in flight. Acks for unknown or already resolved
/// tags are ignored (and counted), so nothing is ever confirmed twice.
struct ConfirmTracker<Token> {
    /// The sequence number the next publish will get.
    private(set) var nextSequence: UInt64 = 1
    /// Sequence number of `slots[offset]`.
    private var base: UInt64 = 1
    private var slots: [Token?] = []
    private var offset = 0
    /// How many publishes are waiting for their confirm.
    private(set) var outstanding = 0
    /// Acks or nacks that named no outstanding publish (duplicates, unknown tags).
    private(set) var ignoredConfirms = 0

    init() {}

    /// Records a publish and returns its sequence number.
    @discardableResult
    mutating func register(_ token: Token) -> UInt64 {
        let sequence = self.nextSequence
        self.slots.append(token)
        self.nextSequence += 1
        self.outstanding += 1
        return sequence
    }

    /// Resolves the publishes an ack or nack names, oldest first.
    mutating func resolve(tag: UInt64, multiple: Bool, _ body: (UInt64, Token) -> Void) {
        guard tag >= self.base, tag < self.nextSequence else {
            self.ignoredConfirms += 1
            return
        }
        let last = self.offset + Int(tag - self.base)
        if multiple {
            var resolvedAny = false
            for index in self.offset...last {
                if let token = self.slots[index] {
                    self.slots[index] = nil
                    self.outstanding -= 1
                    resolvedAny = true
                    body(self.base + UInt64(index - self.offset), token)
                }
            }
            if !resolvedAny { self.ignoredConfirms += 1 }
        } else if let token = self.slots[last] {
            self.slots[last] = nil
            self.outstanding -= 1
            body(tag, token)
        } else {
            self.ignoredConfirms += 1
        }
        self.advance()
    }

    /// Changes the oldest outstanding publish matching `predicate`; returns whether one matched.
    /// Used to attach a `basic.return` to its publish before the ack that follows it.
    @discardableResult
    mutating func updateFirst(where predicate: (Token) -> Bool, _ update: (inout Token) -> Void) -> Bool {
        var index = self.offset
        while index < self.slots.count {
            if var token = self.slots[index], predicate(token) {
                update(&token)
                self.slots[index] = token
                return true
            }
            index += 1
        }
        return false
    }

    /// Removes every outstanding publish (the channel closed) and starts numbering at 1 again.
    mutating func reset(_ body: (UInt64, Token) -> Void) {
        for index in self.offset..<self.slots.count {
            if let token = self.slots[index] { body(self.base + UInt64(index - self.offset), token) }
        }
        self = ConfirmTracker()
    }

    private mutating func advance() {
        while self.offset < self.slots.count, self.slots[self.offset] == nil {
            self.offset += 1
            self.base += 1
        }
        if self.offset == self.slots.count {
            self.slots.removeAll(keepingCapacity: true)
            self.offset = 0
        } else if self.offset >= 4096, self.offset * 2 >= self.slots.count {
            self.slots.removeFirst(self.offset)
            self.offset = 0
        }
    }
}
