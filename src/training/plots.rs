//! Pictures of a training run and of an evaluation, as SVG strings (the caller writes them):
//! the learning curve (training loss by step, train/eval loss and eval accuracy by epoch) and
//! the confusion matrix. Drawn with `plotters`; SVG keeps text as text, so no fonts are needed.

use plotters::prelude::*;

use super::evaluate::EvalReport;
use super::TrainReport;

#[derive(Debug, thiserror::Error)]
#[error("drawing: {0}")]
pub struct PlotError(String);

fn err(e: impl std::fmt::Display) -> PlotError {
    PlotError(e.to_string())
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const PURPLE: RGBColor = RGBColor(148, 103, 189);

/// Two panels: losses against optimizer steps (the logged training loss, and each epoch's mean
/// train and eval loss at the epoch's last step), and eval accuracy and macro-F1 by epoch.
pub fn learning_curve_svg(report: &TrainReport) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let title = format!(
            "{}: {} examples × {} epochs (best epoch {})",
            report.settings.task,
            report.train_examples,
            report.epochs.len(),
            report.best_epoch
        );
        let root = root.titled(&title, ("sans-serif", 18)).map_err(err)?;
        let (left, right) = root.split_horizontally(560);

        let steps_per_epoch = report
            .train_examples
            .div_ceil(report.settings.batch_size.max(1));
        let epoch_end = |e: usize| (e * steps_per_epoch) as f64;
        let total = epoch_end(report.epochs.len()).max(1.0);
        let mut losses: Vec<f64> = report.steps.iter().map(|s| s.loss).collect();
        losses.extend(report.epochs.iter().map(|e| e.train_loss));
        losses.extend(
            report
                .epochs
                .iter()
                .filter_map(|e| e.eval.as_ref().map(|v| v.loss)),
        );
        let top = losses
            .iter()
            .cloned()
            .filter(|x| x.is_finite())
            .fold(0f64, f64::max)
            .max(1e-3)
            * 1.05;

        let mut chart = ChartBuilder::on(&left)
            .caption("loss", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..total, 0f64..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("cross-entropy")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                report.steps.iter().map(|s| (s.step as f64, s.loss)),
                BLUE_.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("train, every {} steps", report.settings.log_every))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE_));
        let train_epochs: Vec<(f64, f64)> = report
            .epochs
            .iter()
            .map(|e| (epoch_end(e.epoch), e.train_loss))
            .collect();
        chart
            .draw_series(LineSeries::new(
                train_epochs.clone(),
                ORANGE.stroke_width(2),
            ))
            .map_err(err)?
            .label("train, epoch mean")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ORANGE));
        chart
            .draw_series(
                train_epochs
                    .iter()
                    .map(|&p| Circle::new(p, 3, ORANGE.filled())),
            )
            .map_err(err)?;
        let eval_loss: Vec<(f64, f64)> = report
            .epochs
            .iter()
            .filter_map(|e| Some((epoch_end(e.epoch), e.eval.as_ref()?.loss)))
            .collect();
        if !eval_loss.is_empty() {
            chart
                .draw_series(LineSeries::new(eval_loss.clone(), GREEN_.stroke_width(2)))
                .map_err(err)?
                .label("eval")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GREEN_));
            chart
                .draw_series(
                    eval_loss
                        .iter()
                        .map(|&p| Circle::new(p, 3, GREEN_.filled())),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;

        let epochs = report.epochs.len() as f64;
        let mut chart = ChartBuilder::on(&right)
            .caption("eval", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(40)
            .build_cartesian_2d(0.5f64..epochs + 0.5, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(report.epochs.len().min(12))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        let series = |f: fn(&EvalReport) -> f64| -> Vec<(f64, f64)> {
            report
                .epochs
                .iter()
                .filter_map(|e| Some((e.epoch as f64, f(e.eval.as_ref()?))))
                .collect()
        };
        let (acc, f1) = (series(|e| e.accuracy), series(|e| e.macro_f1));
        if acc.is_empty() {
            right
                .draw(&Text::new("no eval set", (150, 200), ("sans-serif", 16)))
                .map_err(err)?;
        } else {
            for (points, color, name) in [(acc, PURPLE, "accuracy"), (f1, BLUE_, "macro-F1")] {
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(err)?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The confusion matrix as a heat map: rows are true labels, columns predictions; each cell
/// shows its count, shaded by its share of the row.
pub fn confusion_svg(
    report: &EvalReport,
    labels: &[String],
    title: &str,
) -> Result<String, PlotError> {
    let c = report.confusion.len();
    let cell = (480 / c.max(1)).clamp(28, 90) as i32;
    let (margin_left, margin_top) = (140i32, 70i32);
    let side = cell * c as i32;
    let size = (
        (margin_left + side + 30) as u32,
        (margin_top + side + 60) as u32,
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let style = |px: u32| ("sans-serif", px).into_text_style(&root);
        let head = format!(
            "{title}: accuracy {:.1}% of {}",
            100.0 * report.accuracy,
            report.examples
        );
        root.draw(&Text::new(head, (10, 10), style(16)))
            .map_err(err)?;
        root.draw(&Text::new(
            "predicted →",
            (margin_left, margin_top - 40),
            style(13),
        ))
        .map_err(err)?;
        root.draw(&Text::new("true ↓", (10, margin_top - 20), style(13)))
            .map_err(err)?;
        let short = |s: &str| {
            if s.chars().count() > 14 {
                format!("{}…", s.chars().take(13).collect::<String>())
            } else {
                s.to_string()
            }
        };
        for (k, label) in labels.iter().enumerate().take(c) {
            let at = k as i32 * cell;
            root.draw(&Text::new(
                short(label),
                (margin_left + at + 2, margin_top - 18),
                style(11),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                short(label),
                (10, margin_top + at + cell / 2 - 6),
                style(12),
            ))
            .map_err(err)?;
        }
        for (i, row) in report.confusion.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (j, &n) in row.iter().enumerate() {
                let share = n as f64 / total;
                let (x, y) = (margin_left + j as i32 * cell, margin_top + i as i32 * cell);
                let shade = (255.0 - 200.0 * share) as u8;
                let fill = if i == j {
                    RGBColor(shade, 255 - (55.0 * share) as u8, shade)
                } else {
                    RGBColor(255, shade, shade)
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))
                .map_err(err)?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    BLACK.mix(0.2),
                ))
                .map_err(err)?;
                root.draw(&Text::new(
                    n.to_string(),
                    (x + 4, y + cell / 2 - 6),
                    style(12),
                ))
                .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}
