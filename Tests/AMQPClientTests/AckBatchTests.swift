import Testing
@testable import AMQPClient

@Suite struct AckBatchTests {
    @Test func aContiguousRunBecomesOneMultipleAck() {
        let channel = ChannelState(id: 1)
        channel.pendingAcks = [3, 1, 2, 4]
        let batch = channel.takeAckBatch()
        #expect(batch.multipleThrough == 4)
        #expect(batch.singles.isEmpty)
        #expect(channel.settledThrough == 4)
    }

    @Test func gapsAreNeverCoveredByAMultipleAck() {
        let channel = ChannelState(id: 1)
        // 3 is still being worked on: only 1-2 may be acked with multiple; 4 and 5 go alone.
        channel.pendingAcks = [1, 2, 4, 5]
        let batch = channel.takeAckBatch(releaseHeld: true)
        #expect(batch.multipleThrough == 2)
        #expect(batch.singles == [4, 5])
        #expect(channel.settledThrough == 2)
        // When 3 is acked later, everything through 5 is settled; a lone ack goes as is.
        channel.pendingAcks = [3]
        let later = channel.takeAckBatch()
        #expect(later.multipleThrough == nil)
        #expect(later.singles == [3])
        #expect(channel.settledThrough == 5)
    }

    @Test func acksBehindAnUnfinishedDeliveryAreHeldUntilItsAckCoversThem() {
        let channel = ChannelState(id: 1)
        let t0 = ContinuousClock.now
        channel.pendingAcks = [1, 2, 4, 5]
        let batch = channel.takeAckBatch(now: t0)
        #expect(batch.multipleThrough == 2)
        #expect(batch.singles.isEmpty, "4 and 5 wait for 3")
        #expect(channel.heldAcks == [4, 5])
        #expect(channel.heldDeadline == t0 + ChannelState.heldAckTime)
        // 6 joins them; then 3 ends: one multiple-ack through 6 settles 3 to 6.
        channel.pendingAcks = [6]
        #expect(channel.takeAckBatch(now: t0 + .milliseconds(5)).singles.isEmpty)
        channel.pendingAcks = [3]
        let later = channel.takeAckBatch(now: t0 + .milliseconds(10))
        #expect(later.multipleThrough == 6)
        #expect(later.singles.isEmpty)
        #expect(channel.heldAcks.isEmpty && channel.heldDeadline == nil)
    }

    @Test func heldAcksGoWhenTheirTimeIsUpWhenTooManyWaitAndNeverInATransaction() {
        let t0 = ContinuousClock.now
        // Time: the oldest held ack waited heldAckTime.
        let timed = ChannelState(id: 1)
        timed.pendingAcks = [2]
        #expect(timed.takeAckBatch(now: t0).singles.isEmpty)
        #expect(timed.takeAckBatch(now: t0 + ChannelState.heldAckTime).singles == [2])
        // Count: a quarter of the prefetch (8 → 2) may wait.
        let crowded = ChannelState(id: 1)
        crowded.prefetch = (count: 8, global: false)
        crowded.pendingAcks = [2, 3]
        #expect(crowded.takeAckBatch(now: t0).singles.isEmpty)
        crowded.pendingAcks = [4]
        #expect(crowded.takeAckBatch(now: t0).singles == [2, 3, 4])
        // A transaction's acks belong to its commit.
        let transactional = ChannelState(id: 1)
        transactional.transactional = true
        transactional.pendingAcks = [2]
        #expect(transactional.takeAckBatch(now: t0).singles == [2])
    }

    @Test func aHeldAckPassedByTheSettledRunIsStillSent() {
        // A noAck delivery or a reject settled the gap after 4 was held: 4 goes in the next batch.
        let channel = ChannelState(id: 1)
        channel.pendingAcks = [4]
        _ = channel.takeAckBatch()
        channel.markSettled(through: 3)
        #expect(channel.settledThrough == 4)
        let batch = channel.takeAckBatch(releaseHeld: true)
        #expect(batch.multipleThrough == nil)
        #expect(batch.singles == [4])
    }

    @Test func settledByNackOrNoAckCountsTowardsTheRun() {
        let channel = ChannelState(id: 1)
        channel.markSettled(1)          // nacked earlier
        channel.markSettled(through: 3) // multiple ack by the application
        channel.pendingAcks = [5, 4, 6]
        let batch = channel.takeAckBatch()
        #expect(batch.multipleThrough == 6)
        #expect(batch.singles.isEmpty)
    }

    @Test func theMultipleAckNeverNamesATagAlreadyAcked() {
        let channel = ChannelState(id: 1)
        channel.pendingAcks = [3]
        _ = channel.takeAckBatch(releaseHeld: true)          // 3 acked alone
        channel.pendingAcks = [2, 1]
        let batch = channel.takeAckBatch()
        #expect(channel.settledThrough == 3)
        #expect(batch.multipleThrough == 2, "3 was acked already; naming it would close the channel")
        #expect(batch.singles.isEmpty)
    }

    @Test func aSingleAckOutOfOrderStaysSingle() {
        let channel = ChannelState(id: 1)
        channel.pendingAcks = [7]
        let batch = channel.takeAckBatch(releaseHeld: true)
        #expect(batch.multipleThrough == nil)
        #expect(batch.singles == [7])
        #expect(channel.settledThrough == 0)
        #expect(channel.settledAbove == [7])
        channel.resetDeliveries()
        #expect(channel.settledAbove.isEmpty)
    }
}
