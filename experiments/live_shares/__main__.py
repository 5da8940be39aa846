from experiments.live_shares.study import main

main()
