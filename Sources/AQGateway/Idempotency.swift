import CAQOpenSSL

/// Ids for tasks, batches and chains created without one: 122 random bits from OpenSSL's
/// generator, written like a version-4 UUID. Not Foundation's UUID(), which opened
/// and read /dev/urandom each time (two files opened per request, measured). Unpredictable, so a
/// client cannot guess another's ids from its own.
enum GeneratedIds {
    static func next() -> String {
        // OpenSSL's generator (seeded from the system, no system call per id).
        var words: (UInt64, UInt64) = (0, 0)
        let filled = withUnsafeMutableBytes(of: &words) { RAND_bytes($0.baseAddress?.assumingMemoryBound(to: UInt8.self), 16) }
        if filled != 1 {
            var generator = SystemRandomNumberGenerator()
            words = (generator.next(), generator.next())
        }
        let (high, low) = words
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(36)
        func hex(_ value: UInt64, _ count: Int) {
            for i in stride(from: count - 1, through: 0, by: -1) { out.append(digits[Int((value >> (UInt64(i) * 4)) & 15)]) }
        }
        hex(high >> 32, 8); out.append(UInt8(ascii: "-"))
        hex((high >> 16) & 0xffff, 4); out.append(UInt8(ascii: "-"))
        hex(0x4000 | (high & 0x0fff), 4); out.append(UInt8(ascii: "-"))
        hex(0x8000 | ((low >> 48) & 0x3fff), 4); out.append(UInt8(ascii: "-"))
        hex(low & 0xffff_ffff_ffff, 12)
        return String(decoding: out, as: UTF8.self)
    }
}

/// What a request got: status and JSON body.
public struct GatewayReply: Sendable {
    public var status: Int
    public var body: String

    public init(status: Int, body: String) {
        self.status = status
        self.body = body
    }
}

/// Remembers the replies to requests made with an `Idempotency-Key`, so a client retrying a
/// request (a timeout, a lost connection) gets the first reply, and the task is published once.
/// A retry that arrives while the first is still publishing waits for it. Replies that say the
/// task is not safe (5xx) are forgotten: the retry publishes. In memory, per gateway process: at
/// most `capacity` keys, each for `window`.
actor IdempotencyCache {
    private struct Entry {
        var fingerprint: [UInt8]
        var reply: Task<GatewayReply, Never>
        var at: ContinuousClock.Instant
    }

    private let window: Duration
    private let capacity: Int
    private var entries: [String: Entry] = [:]
    /// Keys oldest first (a key forgotten early leaves a stale name here, skipped).
    private var order: [String] = []
    private var head = 0

    init(window: Duration, capacity: Int) {
        self.window = window
        self.capacity = capacity
    }

    /// The reply for `key`: the remembered one, or `make`'s. `fingerprint` (the request's hash)
    /// tells a retry from another request that reuses the key (422).
    func reply(key: String, fingerprint: [UInt8], _ make: @escaping @Sendable () async -> GatewayReply) async -> GatewayReply {
        self.expire(now: .now)
        if let entry = self.entries[key] {
            guard entry.fingerprint == fingerprint else {
                return GatewayReply(status: 422, body: GatewayError.body("idempotency_key_reused",
                                                                         "this Idempotency-Key was used with a different request"))
            }
            return await entry.reply.value
        }
        guard self.capacity > 0 else { return await make() }
        let task = Task { await make() }
        self.entries[key] = Entry(fingerprint: fingerprint, reply: task, at: .now)
        self.order.append(key)
        let reply = await task.value
        if reply.status >= 500 { self.entries[key] = nil }
        return reply
    }

    private func expire(now: ContinuousClock.Instant) {
        while self.head < self.order.count {
            let key = self.order[self.head]
            if let entry = self.entries[key] {
                guard self.entries.count > self.capacity || now - entry.at > self.window else { break }
                self.entries[key] = nil
            }
            self.head += 1
        }
        if self.head > 4096, self.head * 2 > self.order.count {
            self.order.removeFirst(self.head)
            self.head = 0
        }
        // Keys forgotten early (5xx) leave their names behind a live one: drop them now and then.
        if self.order.count - self.head > 2 * max(self.entries.count, 1024) {
            self.order = self.order[self.head...].filter { self.entries[$0] != nil }
            self.head = 0
        }
    }
}
