import Testing
@testable import AMQPClient

@Suite struct ConfirmTrackerTests {
    private func tracker(publishing count: Int) -> ConfirmTracker<Int> {
        var tracker = ConfirmTracker<Int>()
        for index in 1...count { #expect(tracker.register(index) == UInt64(index)) }
        return tracker
    }

    @Test func singleAcksInOrderResolveEachOnce() {
        var tracker = self.tracker(publishing: 3)
        var resolved: [Int] = []
        for tag in 1...3 { tracker.resolve(tag: UInt64(tag), multiple: false) { resolved.append($1) } }
        #expect(resolved == [1, 2, 3])
        #expect(tracker.outstanding == 0)
        #expect(tracker.ignoredConfirms == 0)
    }

    @Test func multipleAckResolvesEverythingUpToTheTag() {
        var tracker = self.tracker(publishing: 10)
        var resolved: [Int] = []
        tracker.resolve(tag: 7, multiple: true) { resolved.append($1) }
        #expect(resolved == Array(1...7))
        #expect(tracker.outstanding == 3)
    }

    @Test func outOfOrderAcksThenMultipleSkipTheAlreadyResolved() {
        var tracker = self.tracker(publishing: 5)
        var resolved: [Int] = []
        tracker.resolve(tag: 2, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 4, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 1, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 5, multiple: true) { resolved.append($1) }
        #expect(resolved == [2, 4, 1, 3, 5])
        #expect(tracker.outstanding == 0)
    }

    @Test func duplicateAndUnknownTagsAreIgnoredNotConfirmedTwice() {
        var tracker = self.tracker(publishing: 3)
        var resolved: [Int] = []
        tracker.resolve(tag: 2, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 2, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 99, multiple: false) { resolved.append($1) }
        tracker.resolve(tag: 0, multiple: true) { resolved.append($1) }
        tracker.resolve(tag: 1, multiple: true) { resolved.append($1) }
        tracker.resolve(tag: 1, multiple: true) { resolved.append($1) }
        #expect(resolved == [2, 1])
        #expect(tracker.ignoredConfirms == 4)
        #expect(tracker.outstanding == 1)
    }

    @Test func resetFailsEverythingOutstandingAndRestartsNumbering() {
        var tracker = self.tracker(publishing: 4)
        tracker.resolve(tag: 2, multiple: false) { _, _ in }
        var failed: [UInt64] = []
        tracker.reset { sequence, _ in failed.append(sequence) }
        #expect(failed == [1, 3, 4])
        #expect(tracker.outstanding == 0)
        #expect(tracker.register(42) == 1)
    }

    @Test func updateFirstAttachesToTheOldestMatchingPublish() {
        var tracker = ConfirmTracker<(id: String, returned: Bool)>()
        tracker.register((id: "a", returned: false))
        tracker.register((id: "b", returned: false))
        tracker.register((id: "b", returned: false))
        let matched = tracker.updateFirst(where: { $0.id == "b" && !$0.returned }) { $0.returned = true }
        #expect(matched)
        var results: [(String, Bool)] = []
        tracker.resolve(tag: 3, multiple: true) { results.append(($1.id, $1.returned)) }
        #expect(results.map(\.1) == [false, true, false])
        #expect(!tracker.updateFirst(where: { _ in true }) { _ in })
    }

    @Test func manyThousandsInFlightWithRandomOrderResolveExactlyOnce() {
        var tracker = ConfirmTracker<Int>()
        let total = 50_000
        for index in 1...total { tracker.register(index) }
        var seen = Set<Int>()
        var duplicates = 0
        var tags = Array(1...total).shuffled()
        // Half as single acks in random order, the rest through multiple acks of random tags.
        let singles = tags.prefix(total / 2)
        for tag in singles {
            tracker.resolve(tag: UInt64(tag), multiple: false) { if !seen.insert($1).inserted { duplicates += 1 } }
        }
        tags = Array(tags.dropFirst(total / 2)).sorted()
        var cursor = 0
        while cursor < tags.count {
            cursor = min(tags.count - 1, cursor + Int.random(in: 0...200))
            tracker.resolve(tag: UInt64(tags[cursor]), multiple: true) { if !seen.insert($1).inserted { duplicates += 1 } }
            cursor += 1
        }
        #expect(seen.count == total)
        #expect(duplicates == 0)
        #expect(tracker.outstanding == 0)
    }
}
