/// Who may send an HTTP request now: the bridge's isolation rules as a small pure state machine.
///
/// Each request belongs to a work queue and goes to a host (`scheme://host:port`). It may start
/// when its queue is under its own concurrency, its host is under the per-host cap, and the
/// bridge is under its total; otherwise it waits, in a line of its own (queue, host) pair, so a
/// hanging host holds at most its cap of one queue's slots and never a slot of another queue or
/// the turn of a request bound elsewhere. When more requests wait for one host than the cap, a
/// new callback is parked instead (the engine sends it back to the broker for a while) so tasks
/// for a dead host cannot fill the prefetch window that other hosts' tasks arrive through.
///
/// The engine feeds events (``submit(_:queue:host:parkable:)``, ``finished(queue:host:)``) and
/// executes the decisions; nothing here does I/O.
struct Admission<Item> {
    struct Limits {
        /// Requests in flight per work queue, by queue index.
        var perQueue: [Int]
        /// Requests in flight to one host, all queues together.
        var perHost: Int
        /// Requests in flight in all.
        var total: Int
        /// Callbacks waiting for one host beyond which a new one is parked.
        var parkAfter: Int
    }

    enum Decision: Equatable {
        case start
        case wait
        case park
    }

    private struct Pair: Hashable {
        var queue: Int
        var host: String
    }

    let limits: Limits
    private var queueInFlight: [Int]
    private var hostInFlight: [String: Int] = [:]
    private var hostWaiting: [String: Int] = [:]
    private(set) var inFlight = 0
    private var lines: [Pair: Line] = [:]
    /// Pairs with someone waiting, in the order they are served (round robin).
    private var order: [Pair] = []
    private var next = 0

    init(limits: Limits) {
        self.limits = limits
        self.queueInFlight = Array(repeating: 0, count: limits.perQueue.count)
    }

    var waiting: Int { self.hostWaiting.values.reduce(0, +) }
    func inFlight(host: String) -> Int { self.hostInFlight[host] ?? 0 }
    func inFlight(queue: Int) -> Int { self.queueInFlight[queue] }
    func waiting(host: String) -> Int { self.hostWaiting[host] ?? 0 }

    private func hasRoom(queue: Int, host: String) -> Bool {
        self.inFlight < self.limits.total && self.queueInFlight[queue] < self.limits.perQueue[queue]
            && self.hostInFlight[host, default: 0] < self.limits.perHost
    }

    private mutating func take(queue: Int, host: String) {
        self.inFlight += 1
        self.queueInFlight[queue] += 1
        self.hostInFlight[host, default: 0] += 1
    }

    /// A request wants to start. `.start`: it holds its slots now. `.wait`: it is queued and will
    /// come out of ``finished(queue:host:)``. `.park`: it was not queued (only when `parkable`).
    mutating func submit(_ item: Item, queue: Int, host: String, parkable: Bool) -> Decision {
        let pair = Pair(queue: queue, host: host)
        if self.lines[pair] == nil, self.hasRoom(queue: queue, host: host) {
            self.take(queue: queue, host: host)
            return .start
        }
        if parkable, self.hostInFlight[host, default: 0] >= self.limits.perHost,
           self.hostWaiting[host, default: 0] >= self.limits.parkAfter {
            return .park
        }
        if self.lines[pair] == nil {
            self.lines[pair] = Line()
            self.order.append(pair)
        }
        self.lines[pair]?.append(item)
        self.hostWaiting[host, default: 0] += 1
        return .wait
    }

    /// A request ended: its slots are free. Returns the waiting requests that start now (each
    /// holding its slots), fairly across the (queue, host) lines.
    mutating func finished(queue: Int, host: String) -> [Item] {
        self.inFlight -= 1
        self.queueInFlight[queue] -= 1
        let left = self.hostInFlight[host, default: 1] - 1
        self.hostInFlight[host] = left > 0 ? left : nil
        var started: [Item] = []
        var checked = 0
        while !self.order.isEmpty, checked < self.order.count, self.inFlight < self.limits.total {
            if self.next >= self.order.count { self.next = 0 }
            let pair = self.order[self.next]
            guard self.hasRoom(queue: pair.queue, host: pair.host), let item = self.lines[pair]?.popFirst() else {
                self.next += 1
                checked += 1
                continue
            }
            self.take(queue: pair.queue, host: pair.host)
            let waiting = self.hostWaiting[pair.host, default: 1] - 1
            self.hostWaiting[pair.host] = waiting > 0 ? waiting : nil
            started.append(item)
            checked = 0
            if self.lines[pair]?.isEmpty ?? true {
                self.lines[pair] = nil
                self.order.remove(at: self.next)
            } else {
                self.next += 1
            }
        }
        return started
    }

    /// Removes and returns every waiting request (shutdown).
    mutating func drainWaiting() -> [Item] {
        var all: [Item] = []
        for pair in self.order {
            while let item = self.lines[pair]?.popFirst() { all.append(item) }
        }
        self.lines.removeAll()
        self.order.removeAll()
        self.hostWaiting.removeAll()
        self.next = 0
        return all
    }

    /// A FIFO that pops in O(1) amortised.
    private struct Line {
        private var items: [Item] = []
        private var head = 0
        var isEmpty: Bool { self.head >= self.items.count }
        mutating func append(_ item: Item) { self.items.append(item) }
        mutating func popFirst() -> Item? {
            guard self.head < self.items.count else { return nil }
            let item = self.items[self.head]
            self.head += 1
            if self.head > 64, self.head * 2 > self.items.count {
                self.items.removeFirst(self.head)
                self.head = 0
            }
            return item
        }
    }
}
