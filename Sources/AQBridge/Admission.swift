/// Who may send an HTTP request now: the bridge's isolation rules as a small pure state machine.
///
/// Each request belongs to a work queue and goes to a host (`scheme://host:port`). It may start
/// when its queue is under its own concurrency, its host is under the per-host cap, and the
/// bridge is under its total; otherwise it waits, in a line of its own (queue, host) pair, so a
/// slow host holds at most its cap of one queue's slots and never a slot of another queue or the
/// turn of a request bound elsewhere.
///
/// A line must not grow without bound either: the tasks waiting for a slow or hanging host would
/// fill the prefetch window that every other host's tasks arrive through. So a callback whose
/// expected wait — its place in its host's line, divided by the cap, times the host's latency
/// (the moving average of its answers, or, when it has stopped answering, how long it has been
/// silent) — exceeds `maxWait` is parked: the engine sends it back to the broker for a while. A busy
/// host that answers fast keeps a long line; a host that hangs loses it.
///
/// Within a line, urgent requests (a webhook: the last request of a task whose callback has
/// answered) go before the others (callbacks, which start tasks): finishing work already done
/// frees its delivery and its memory, and a task's result does not wait behind the prefetch
/// window's worth of callbacks that arrived after it. It cannot starve the others: each webhook
/// follows one callback's answer.
///
/// The engine feeds events (``submit(_:queue:host:parkable:now:)``, ``finished(queue:host:latency:now:)``,
/// ``overdue(now:)``) and executes the decisions; nothing here does I/O or reads a clock.
struct Admission<Item, Host: Hashable> {
    struct Limits {
        /// Requests in flight per work queue, by queue index.
        var perQueue: [Int]
        /// Requests in flight to one host, all queues together.
        var perHost: Int
        /// Requests in flight in all.
        var total: Int
        /// The longest a parkable request should expect to wait for its host.
        var maxWait: Duration
    }

    enum Decision: Equatable {
        case start
        case wait
        case park
    }

    private struct Pair: Hashable {
        var queue: Int
        var host: Host
    }

    private struct HostState {
        var inFlight = 0
        var waiting = 0
        /// Of `waiting`, the urgent ones (ahead of the others in their lines).
        var urgentWaiting = 0
        /// Moving average of answer times, in seconds (nil: none yet).
        var latency: Double?
        /// The last answer, or when requests began to be in flight after none were.
        var lastProgress: ContinuousClock.Instant
    }

    private struct Waiting {
        var item: Item
        var parkable: Bool
        var urgent: Bool
    }

    let limits: Limits
    private var queueInFlight: [Int]
    private var hosts: [Host: HostState] = [:]
    private(set) var inFlight = 0
    private(set) var waiting = 0
    private var lines: [Pair: Line] = [:]
    /// Pairs with someone waiting, in the order they are served (round robin).
    private var order: [Pair] = []
    private var next = 0

    init(limits: Limits) {
        self.limits = limits
        self.queueInFlight = Array(repeating: 0, count: limits.perQueue.count)
    }

    func inFlight(host: Host) -> Int { self.hosts[host]?.inFlight ?? 0 }
    func inFlight(queue: Int) -> Int { self.queueInFlight[queue] }
    func waiting(host: Host) -> Int { self.hosts[host]?.waiting ?? 0 }
    /// Whether a host has requests in flight or waiting (its number may not be reused).
    func isInUse(host: Host) -> Bool { (self.hosts[host]?.inFlight ?? 0) > 0 || (self.hosts[host]?.waiting ?? 0) > 0 }

    private func hasRoom(queue: Int, host: Host) -> Bool {
        self.inFlight < self.limits.total && self.queueInFlight[queue] < self.limits.perQueue[queue]
            && (self.hosts[host]?.inFlight ?? 0) < self.limits.perHost
    }

    private mutating func take(queue: Int, host: Host, now: ContinuousClock.Instant) {
        self.inFlight += 1
        self.queueInFlight[queue] += 1
        self.withHost(host, insertingAt: now) { state in
            if state.inFlight == 0 { state.lastProgress = now }
            state.inFlight += 1
        }
    }

    // `hosts[host]?.field += 1` and `lines[pair]?.append(x)` go through Dictionary's
    // optional-yielding modify accessor, whose coroutine frame is heap-allocated for values of
    // this size: a malloc and a free per statement, about 50 per task (measured with a uprobe on
    // malloc). These mutate the value in place in the dictionary's storage instead.

    /// Runs `body` on `host`'s state in place; inserts a fresh state first when `insertingAt` is
    /// given and the host has none. Nil when the host has no state (and none was inserted).
    @discardableResult
    private mutating func withHost<R>(_ host: Host, insertingAt now: ContinuousClock.Instant? = nil, _ body: (inout HostState) -> R) -> R? {
        var index = self.hosts.index(forKey: host)
        if index == nil, let now {
            self.hosts[host] = HostState(lastProgress: now)
            index = self.hosts.index(forKey: host)
        }
        guard let index else { return nil }
        return body(&self.hosts.values[index])
    }

    /// Runs `body` on `pair`'s line in place; nil when it has none.
    private mutating func withLine<R>(_ pair: Pair, _ body: (inout Line) -> R) -> R? {
        guard let index = self.lines.index(forKey: pair) else { return nil }
        return body(&self.lines.values[index])
    }

    /// How long a request `position` places back in `host`'s line may expect to wait.
    private func expectedWait(host: Host, position: Int, now: ContinuousClock.Instant) -> Double {
        guard let state = self.hosts[host] else { return 0 }
        var latency = state.latency ?? 0
        if state.inFlight > 0 {
            let silent = now - state.lastProgress
            latency = max(latency, Double(silent.components.seconds) + Double(silent.components.attoseconds) / 1e18)
        }
        let rounds = (position + self.limits.perHost - 1) / self.limits.perHost
        return Double(rounds) * latency
    }

    private var maxWaitSeconds: Double {
        Double(self.limits.maxWait.components.seconds) + Double(self.limits.maxWait.components.attoseconds) / 1e18
    }

    /// A request wants to start. `.start`: it holds its slots now. `.wait`: it is queued and will
    /// come out of ``finished(queue:host:latency:now:)`` — an `urgent` one ahead of the others in
    /// its line. `.park`: it was not queued (only when `parkable`, when its expected wait is too long).
    mutating func submit(_ item: Item, queue: Int, host: Host, parkable: Bool, urgent: Bool = false, now: ContinuousClock.Instant) -> Decision {
        let pair = Pair(queue: queue, host: host)
        if self.lines[pair] == nil, self.hasRoom(queue: queue, host: host) {
            self.take(queue: queue, host: host, now: now)
            return .start
        }
        if parkable, (self.hosts[host]?.inFlight ?? 0) >= self.limits.perHost {
            let ahead = urgent ? self.hosts[host]?.urgentWaiting ?? 0 : self.waiting(host: host)
            if self.expectedWait(host: host, position: ahead + 1, now: now) > self.maxWaitSeconds { return .park }
        }
        if self.lines[pair] == nil {
            self.lines[pair] = Line()
            self.order.append(pair)
        }
        self.withLine(pair) { $0.append(Waiting(item: item, parkable: parkable, urgent: urgent)) }
        self.withHost(host, insertingAt: now) { state in
            state.waiting += 1
            if urgent { state.urgentWaiting += 1 }
        }
        self.waiting += 1
        return .wait
    }

    private mutating func leftLine(_ waiting: Waiting, host: Host) {
        self.withHost(host) { state in
            state.waiting -= 1
            if waiting.urgent { state.urgentWaiting -= 1 }
        }
        self.waiting -= 1
    }

    /// A request ended after `latency`: its slots are free. Returns the waiting requests that
    /// start now (each holding its slots), fairly across the (queue, host) lines.
    mutating func finished(queue: Int, host: Host, latency: Duration?, now: ContinuousClock.Instant) -> [Item] {
        var started: [Item] = []
        self.finished(queue: queue, host: host, latency: latency, now: now, into: &started)
        return started
    }

    /// ``finished(queue:host:latency:now:)`` appending to `started` (a buffer the caller keeps:
    /// no allocation per finished request).
    mutating func finished(queue: Int, host: Host, latency: Duration?, now: ContinuousClock.Instant, into started: inout [Item]) {
        self.inFlight -= 1
        self.queueInFlight[queue] -= 1
        self.withHost(host) { state in
            state.inFlight -= 1
            if let latency {
                let seconds = Double(latency.components.seconds) + Double(latency.components.attoseconds) / 1e18
                state.latency = state.latency.map { $0 * 0.8 + seconds * 0.2 } ?? seconds
                state.lastProgress = now
            }
        }
        var checked = 0
        while !self.order.isEmpty, checked < self.order.count, self.inFlight < self.limits.total {
            if self.next >= self.order.count { self.next = 0 }
            let pair = self.order[self.next]
            guard self.hasRoom(queue: pair.queue, host: pair.host), let waiting = self.withLine(pair, { $0.popFirst() }) ?? nil else {
                self.next += 1
                checked += 1
                continue
            }
            self.take(queue: pair.queue, host: pair.host, now: now)
            self.leftLine(waiting, host: pair.host)
            started.append(waiting.item)
            checked = 0
            self.removeIfEmpty(pair, at: self.next)
        }
        self.forgetIdleHosts(host)
    }

    /// Parkable requests whose expected wait has grown past `maxWait` (their host slowed down or
    /// stopped answering), taken out of their lines from the back: the engine parks them.
    mutating func overdue(now: ContinuousClock.Instant) -> [Item] {
        var out: [Item] = []
        // (Collected first: mutating `hosts` while iterating it would copy it. Usually empty: no
        // allocation.)
        let crowded = self.hosts.compactMap { $0.value.waiting > 0 && $0.value.inFlight >= self.limits.perHost ? ($0.key, $0.value) : nil }
        for (host, state) in crowded {
            // How many of its line can be served within maxWait.
            let latency = self.expectedWait(host: host, position: self.limits.perHost, now: now)
            let keep = latency <= 0 ? state.waiting : self.limits.perHost * Int(self.maxWaitSeconds / latency)
            var excess = state.waiting - keep
            guard excess > 0 else { continue }
            for pair in self.order where pair.host == host && excess > 0 {
                while excess > 0, let waiting = self.withLine(pair, { $0.popLast(where: \.parkable) }) ?? nil {
                    out.append(waiting.item)
                    self.leftLine(waiting, host: host)
                    excess -= 1
                }
            }
        }
        for index in self.order.indices.reversed() where self.lines[self.order[index]]?.isEmpty ?? true {
            self.lines[self.order[index]] = nil
            self.order.remove(at: index)
            if index < self.next { self.next -= 1 }
        }
        return out
    }

    /// Removes and returns every waiting request (shutdown).
    mutating func drainWaiting() -> [Item] {
        var all: [Item] = []
        for pair in self.order {
            while let waiting = self.lines[pair]?.popFirst() { all.append(waiting.item) }
        }
        self.lines.removeAll()
        self.order.removeAll()
        for host in Array(self.hosts.keys) {
            self.withHost(host) { state in
                state.waiting = 0
                state.urgentWaiting = 0
            }
        }
        self.waiting = 0
        self.next = 0
        return all
    }

    private mutating func removeIfEmpty(_ pair: Pair, at index: Int) {
        guard self.lines[pair]?.isEmpty ?? true else {
            if index == self.next { self.next += 1 }
            return
        }
        self.lines[pair] = nil
        self.order.remove(at: index)
        if index < self.next { self.next -= 1 }
    }

    /// Hosts with nothing in flight or waiting are forgotten (a bounded map, whatever URLs come).
    private mutating func forgetIdleHosts(_ host: Host) {
        if let state = self.hosts[host], state.inFlight == 0, state.waiting == 0, self.hosts.count > 1024 {
            self.hosts[host] = nil
        }
    }

    /// A (queue, host) pair's line: its urgent requests first, each kind in arrival order; parked
    /// from the back (the others before the urgent ones).
    private struct Line {
        private var urgent = Ring()
        private var others = Ring()
        var isEmpty: Bool { self.urgent.isEmpty && self.others.isEmpty }

        mutating func append(_ item: Waiting) {
            if item.urgent { self.urgent.append(item) } else { self.others.append(item) }
        }

        mutating func popFirst() -> Waiting? { self.urgent.popFirst() ?? self.others.popFirst() }

        mutating func popLast(where predicate: (Waiting) -> Bool) -> Waiting? {
            self.others.popLast(where: predicate) ?? self.urgent.popLast(where: predicate)
        }
    }

    /// A FIFO on a ring of slots: pops from the front in O(1) (the item moves out: no copy and
    /// no compaction), and from the back.
    private struct Ring {
        private var slots: [Waiting?] = []
        private var head = 0
        private var count = 0
        var isEmpty: Bool { self.count == 0 }

        mutating func append(_ item: Waiting) {
            if self.count == self.slots.count { self.grow() }
            self.slots[(self.head + self.count) % self.slots.count] = item
            self.count += 1
        }

        mutating func popFirst() -> Waiting? {
            guard self.count > 0 else { return nil }
            let item = self.slots[self.head].take()
            self.head = (self.head + 1) % self.slots.count
            self.count -= 1
            return item
        }

        /// The last item matching `predicate`, removed (the ones behind it move up a slot).
        mutating func popLast(where predicate: (Waiting) -> Bool) -> Waiting? {
            var offset = self.count - 1
            while offset >= 0 {
                let index = (self.head + offset) % self.slots.count
                if let item = self.slots[index], predicate(item) {
                    for next in offset..<(self.count - 1) {
                        self.slots[(self.head + next) % self.slots.count] = self.slots[(self.head + next + 1) % self.slots.count].take()
                    }
                    self.slots[(self.head + self.count - 1) % self.slots.count] = nil
                    self.count -= 1
                    return item
                }
                offset -= 1
            }
            return nil
        }

        private mutating func grow() {
            var bigger = [Waiting?](repeating: nil, count: max(16, self.slots.count * 2))
            for offset in 0..<self.count { bigger[offset] = self.slots[(self.head + offset) % self.slots.count].take() }
            self.slots = bigger
            self.head = 0
        }
    }
}
