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
        let batch = channel.takeAckBatch()
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
        _ = channel.takeAckBatch()          // 3 acked alone
        channel.pendingAcks = [2, 1]
        let batch = channel.takeAckBatch()
        #expect(channel.settledThrough == 3)
        #expect(batch.multipleThrough == 2, "3 was acked already; naming it would close the channel")
        #expect(batch.singles.isEmpty)
    }

    @Test func aSingleAckOutOfOrderStaysSingle() {
        let channel = ChannelState(id: 1)
        channel.pendingAcks = [7]
        let batch = channel.takeAckBatch()
        #expect(batch.multipleThrough == nil)
        #expect(batch.singles == [7])
        #expect(channel.settledThrough == 0)
        #expect(channel.settledAbove == [7])
        channel.resetDeliveries()
        #expect(channel.settledAbove.isEmpty)
    }
}
