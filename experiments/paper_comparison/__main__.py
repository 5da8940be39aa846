from experiments.paper_comparison.study import main

main()
