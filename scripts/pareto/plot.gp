# Perplexity change against KV bytes per token (fraction of fp16), one point
# style per series, each series' Pareto front as a step line. Called by
# scripts/pareto/plot.sh, which computes the fronts (awk) and sets:
#   points  data file, tab-separated: one block per series (x = of_fp16,
#           y = vs_base_pct in %, label), blocks apart by two blank lines
#   fronts  the same for each series' Pareto front, sorted by x
#   n       the number of series; name1 .. nameN their names, style1 ..
#           styleN their point style and colour (1-based, stable per name)
#   labels  the series (1-based) whose points get their labels written
#           (the 1st, 3rd... of them above their points, the others below)
#   title_  the plot title
#   out     output prefix: writes out.png and out.svg
#
# y axis: symmetric log, y = sgn(d) log10(1 + |d|) for a change of d %:
# linear near 0 (|d| << 1 %), logarithmic beyond, so -0.1 % and +100 %
# both show. Tick labels are the changes in %.
f(d) = sgn(d) * log10(1 + abs(d))

set datafile separator '\t'
set key top right box opaque
set grid xtics ytics lc rgb '#dddddd'
set xlabel 'KV cache bytes per token, fraction of fp16'
set ylabel 'perplexity change vs own fp16 (%, symmetric log scale)'
set title title_ . "\n(dashed: each series' Pareto front)" noenhanced
set xrange [*:1.05]   # from the tic below the smallest point
set xtics 0.1
set ytics ('-1' f(-1), '0' 0, '0.5' f(0.5), '1' f(1), '2' f(2), '5' f(5), '10' f(10), \
           '20' f(20), '50' f(50), '100' f(100), '200' f(200), '500' f(500), '1000' f(1000))
set yrange [f(-1):*]
set offsets 0, 0, graph 0.06, 0   # room above the worst point

st(i) = value(sprintf('style%d', i))
pt(i) = word('7 5 9 11 13 15 4 6', (i - 1) % 8 + 1) + 0
lc(i) = word('#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f', (i - 1) % 8 + 1)

cmd = 'plot'
do for [i = 1:n] {
  cmd = cmd . sprintf("%s points index %d using 1:(f($2)) with points pt %d ps 1.3 lc rgb '%s' title '%s'", \
    (i > 1 ? ',' : ''), i - 1, pt(st(i)), lc(st(i)), value(sprintf('name%d', i)))
  cmd = cmd . sprintf(", fronts index %d using 1:(f($2)) with steps lw 1.5 dt 2 lc rgb '%s' notitle", \
    i - 1, lc(st(i)))
}
# Labels alternate sides along each series (its points come sorted by
# bytes, then change): even rows to the right, odd rows to the left, so
# neighbours at the same bytes do not write over each other.
j = 0
do for [i in labels] {
  j = j + 1
  dy = (j % 2 ? 0.35 : -0.6)
  cmd = cmd . sprintf(", points index %d using 1:(int($0) %% 2 ? NaN : f($2)):3 with labels left offset 0.7,%g font ',8' textcolor rgb '%s' noenhanced notitle", i - 1, dy, lc(st(i + 0)))
  cmd = cmd . sprintf(", points index %d using 1:(int($0) %% 2 ? f($2) : NaN):3 with labels right offset -0.7,%g font ',8' textcolor rgb '%s' noenhanced notitle", i - 1, dy, lc(st(i + 0)))
}

set terminal pngcairo size 1400,900 font ',11' noenhanced
set output out . '.png'
eval cmd
set terminal svg size 1400,900 dynamic font 'sans,11' noenhanced
set output out . '.svg'
eval cmd
set output
